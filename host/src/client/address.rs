//! Where the daemon listens: a unix socket path or a TCP host and port.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The address of a wasm-task daemon.
///
/// Written `unix:/path/to/socket` or `tcp:host:port` (an IPv6 host goes in
/// brackets: `tcp:[::1]:7000`). [`FromStr`] parses that form and [`Display`]
/// prints it back.
///
/// [`Display`]: fmt::Display
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP endpoint.
    Tcp {
        /// Host name or IP address, without brackets.
        host: String,
        /// TCP port.
        port: u16,
    },
}

/// Why a string is not an [`Address`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {input:?}: {reason}")]
pub struct ParseAddressError {
    input: String,
    reason: &'static str,
}

impl ParseAddressError {
    fn new(input: &str, reason: &'static str) -> Self {
        ParseAddressError { input: input.to_owned(), reason }
    }
}

impl FromStr for Address {
    type Err = ParseAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ParseAddressError::new(s, "the socket path is empty"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            return parse_tcp(rest).map_err(|reason| ParseAddressError::new(s, reason));
        }
        Err(ParseAddressError::new(s, "expected unix:PATH or tcp:HOST:PORT"))
    }
}

/// Parses the `host:port` part of a TCP address.
fn parse_tcp(rest: &str) -> Result<Address, &'static str> {
    let (host, port) = rest.rsplit_once(':').ok_or("expected tcp:HOST:PORT")?;
    let port = port.parse::<u16>().map_err(|_| "the port is not a number from 0 to 65535")?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']').ok_or("an IPv6 host must end with ']'")?,
        None if host.contains(':') => return Err("an IPv6 host must be written in brackets"),
        None => host,
    };
    if host.is_empty() {
        return Err("the host is empty");
    }
    Ok(Address::Tcp { host: host.to_owned(), port })
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Address, ParseAddressError> {
        s.parse()
    }

    #[test]
    fn unix_and_tcp_addresses_round_trip_through_display() {
        for text in ["unix:/run/wasm-task.sock", "tcp:127.0.0.1:7000", "tcp:[::1]:80", "tcp:h:1"] {
            assert_eq!(parse(text).unwrap().to_string(), text);
        }
        assert_eq!(parse("tcp:[::1]:80").unwrap(), Address::Tcp { host: "::1".into(), port: 80 });
        assert_eq!(parse("unix:rel/sock").unwrap(), Address::Unix("rel/sock".into()));
    }

    #[test]
    fn anything_else_is_refused_with_the_input_and_the_reason() {
        let cases = [
            ("/run/x.sock", "expected unix:PATH or tcp:HOST:PORT"),
            ("unix:", "the socket path is empty"),
            ("tcp:localhost", "expected tcp:HOST:PORT"),
            ("tcp:localhost:http", "the port is not a number from 0 to 65535"),
            ("tcp::80", "the host is empty"),
            ("tcp:::1:80", "an IPv6 host must be written in brackets"),
            ("tcp:[::1:80", "an IPv6 host must end with ']'"),
        ];
        for (input, reason) in cases {
            let err = parse(input).unwrap_err();
            assert_eq!(err.to_string(), format!("invalid address {input:?}: {reason}"));
        }
    }
}
