//! Byte streams that are plain TCP or TLS over TCP, for the client side and the server side.
//! The plain variants forward straight to the socket, so a plaintext connection costs what
//! a bare `TcpStream` costs: one enum match per call, no allocation, no dynamic dispatch.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

type ServerSideTls = tokio_rustls::server::TlsStream<TcpStream>;
type ClientSideTls = tokio_rustls::client::TlsStream<TcpStream>;

/// A client's connection to the proxy.
pub enum ClientStream {
    Plain(TcpStream),
    /// Boxed: rustls state is large and most clients may be plaintext.
    Tls(Box<ServerSideTls>),
}

/// The proxy's connection to the upstream server.
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<ClientSideTls>),
}

impl ClientStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// The TCP connection underneath (for its addresses).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(t) => t.get_ref().0,
        }
    }

    /// Waits until a read may make progress. With TLS, decrypted bytes rustls already holds
    /// count as readable even though the socket has nothing new.
    pub async fn readable(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.readable().await,
            ClientStream::Tls(t) => {
                if tls_has_plaintext(t.get_mut().1) {
                    return Ok(());
                }
                t.get_ref().0.readable().await
            }
        }
    }

    /// Reads without waiting; `WouldBlock` when nothing is available.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => read_plain(s, buf),
            ClientStream::Tls(t) => try_read_tls(Pin::new(&mut **t), buf),
        }
    }
}

/// True when a read would return at once: plaintext buffered, or the peer closed or broke
/// the stream (the read reports that).
fn tls_has_plaintext(conn: &mut rustls::ServerConnection) -> bool {
    match conn.process_new_packets() {
        Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
        Err(_) => true,
    }
}

/// Polls a read once with a waker that does nothing: the caller waits with `readable()`
/// afterwards, which registers its own interest in the socket.
fn try_read_tls<S: AsyncRead>(s: Pin<&mut S>, buf: &mut [u8]) -> io::Result<usize> {
    let mut cx = Context::from_waker(noop_waker());
    let mut rb = ReadBuf::new(buf);
    match s.poll_read(&mut cx, &mut rb) {
        Poll::Ready(Ok(())) => Ok(rb.filled().len()),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// Reads what the socket has without waiting. A read that leaves room in `buf` took all
/// the kernel had, so the reactor's readiness is cleared with it: the next read waits for
/// the next readiness event instead of making a `recv` that returns `EAGAIN` (one per
/// transaction otherwise, as measured in BENCHMARKS 7). The clear is tick-checked by tokio:
/// bytes that arrive after this read bring a new readiness event that the clear does not
/// erase.
fn read_plain(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = None;
    let r = s.try_io(tokio::io::Interest::READABLE, || {
        let n = io::Read::read(&mut &*socket2::SockRef::from(s), buf)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            // Reported as WouldBlock so that tokio clears the readiness just consumed.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => r,
    }
}

/// `poll_read` of a plain socket with [`read_plain`]'s readiness rule.
fn poll_read_plain(
    s: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        std::task::ready!(s.poll_read_ready(cx))?;
        match read_plain(s, buf.initialize_unfilled()) {
            Ok(n) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            // Readiness was stale and is now cleared: the next poll registers the waker.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

struct Noop;

impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

fn noop_waker() -> &'static Waker {
    static W: OnceLock<Waker> = OnceLock::new();
    W.get_or_init(|| Waker::from(Arc::new(Noop)))
}

impl ServerStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }

    /// Waits until a read may make progress, as [`ClientStream::readable`].
    pub async fn readable(&mut self) -> io::Result<()> {
        match self {
            ServerStream::Plain(s) => s.readable().await,
            ServerStream::Tls(t) => {
                let ready = match t.get_mut().1.process_new_packets() {
                    Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
                    Err(_) => true,
                };
                if ready {
                    return Ok(());
                }
                t.get_ref().0.readable().await
            }
        }
    }

    /// Reads without waiting; `WouldBlock` when nothing is available. On plain TCP this
    /// makes no system call unless the reactor has seen the socket readable.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Plain(s) => read_plain(s, buf),
            ServerStream::Tls(t) => try_read_tls(Pin::new(&mut **t), buf),
        }
    }
}

macro_rules! delegate_io {
    ($ty:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => poll_read_plain(s, cx, buf),
                    $ty::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
                }
            }
        }

        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(t) => Pin::new(&mut **t).poll_write(cx, buf),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    // TCP has no user-space buffer to flush.
                    $ty::Plain(_) => Poll::Ready(Ok(())),
                    $ty::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_io!(ClientStream);
delegate_io!(ServerStream);
