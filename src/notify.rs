//! Tells systemd how the service is doing (sd_notify: READY=1, STOPPING=1, WATCHDOG=1) over `$NOTIFY_SOCKET`; depends on std only.
//!
//! Why no crate: the protocol is one datagram of `KEY=VALUE` lines to a Unix socket named by
//! an environment variable. The small, maintained `sd-notify` crate does exactly this, but
//! the ~30 lines below add no dependency to audit or update, and they are all we need.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (e.g. `"READY=1"`) to systemd. Without `NOTIFY_SOCKET` (not run by systemd
/// with `Type=notify`) it does nothing and answers `Ok(false)`.
pub fn notify(state: &str) -> io::Result<bool> {
    notify_to(std::env::var_os("NOTIFY_SOCKET").as_deref(), state)
}

/// `notify` with the socket given (`None`: not under systemd, nothing is sent).
fn notify_to(socket: Option<&std::ffi::OsStr>, state: &str) -> io::Result<bool> {
    let Some(path) = socket else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let path = path.as_encoded_bytes();
    match path.first() {
        // A leading '@' names a socket in Linux's abstract namespace (no file).
        Some(b'@') => send_abstract(&socket, &path[1..], state)?,
        Some(b'/') => {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
            socket.send_to(state.as_bytes(), path)?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an abstract name",
            ));
        }
    }
    Ok(true)
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist on Linux only",
    ))
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC` (systemd's advice), when the
/// watchdog is on and meant for this process (`WATCHDOG_PID`, if set, is our pid).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Logs a failed notification; the service keeps running (systemd will notice on its own).
pub fn notify_or_warn(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(state, error = %e, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    // The socket is passed in rather than set in the environment: unit tests run on many
    // threads, and set_var races every other thread's getenv.
    #[test]
    fn sends_datagrams_to_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        assert!(notify_to(Some(path.as_os_str()), "READY=1").unwrap());
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("larder-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
            let server = UnixDatagram::bind_addr(&addr).unwrap();
            let at = format!("@{name}");
            assert!(notify_to(Some(OsStr::new(&at)), "STOPPING=1").unwrap());
            let n = server.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"STOPPING=1");
        }

        assert!(!notify_to(None, "READY=1").unwrap());
        let relative = notify_to(Some(OsStr::new("relative.sock")), "READY=1");
        assert_eq!(relative.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
