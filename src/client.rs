//! A mutual-TLS gRPC channel to a credvault server, for the client commands,
//! the benchmarks and the tests: rustls (TLS 1.3, ring), TCP_NODELAY, h2.

use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::tls;

/// Connects to `server` (`host:port`), trusting `ca` and presenting `cert`/`key`.
pub async fn connect(server: &str, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Channel> {
    connect_with(server, tls::client_config(ca, cert, key)?).await
}

/// Connects with a ready rustls client configuration (tests use odd ones).
pub async fn connect_with(server: &str, config: rustls::ClientConfig) -> anyhow::Result<Channel> {
    let host = server.rsplit_once(':').map_or(server, |(host, _)| host);
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())?;
    let connector = TlsConnector::from(Arc::new(config));
    let address = server.to_owned();
    let endpoint = Endpoint::from_shared(format!("http://{server}"))?;
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name, address) = (connector.clone(), name.clone(), address.clone());
            async move {
                let tcp = TcpStream::connect(&address).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}
