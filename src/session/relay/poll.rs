//! The relay loop polling both sockets, and the drains and internal queries run on a
//! server with no client traffic.

use super::replay::Held;
use super::{RelayEvent, RelayState};
use crate::pool::ServerConn;
use crate::protocol;
use crate::tls::ClientStream;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Relays until something needs the session's attention.
pub async fn relay(
    client: &mut ClientStream,
    server: &mut ServerConn,
    st: &mut RelayState,
) -> RelayEvent {
    let ev = poll_fn(|cx| poll_relay(cx, client, server, st)).await;
    if matches!(ev, RelayEvent::Stale) {
        return ev;
    }
    // Server bytes held while waiting for the first reply are scanned before anyone
    // else (a drain, a release) reads this stream.
    match st.release_hold(&mut server.prepared) {
        Ok(()) => ev,
        Err(e) => RelayEvent::ServerProtocol(e),
    }
}

fn poll_relay(
    cx: &mut Context<'_>,
    client: &mut ClientStream,
    server: &mut ServerConn,
    st: &mut RelayState,
) -> Poll<RelayEvent> {
    loop {
        let mut progressed = false;

        // client -> server
        st.advance_rewrite(&mut server.prepared);
        let limit = st.c2s_limit();
        if limit > st.c2s.pos {
            match Pin::new(&mut server.stream).poll_write(cx, st.c2s.data_to(limit)) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(st.server_gone(io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    st.c2s.consume(n);
                    st.after_client_write();
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(st.server_gone(e)),
                Poll::Pending => {}
            }
        }
        if !st.terminated && !st.client_eof && st.c2s.has_spare() {
            let _ = st.c2s.spare();
            let from = st.c2s.end;
            let mut rb = ReadBuf::new(st.c2s.spare());
            match Pin::new(&mut *client).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        st.client_eof = true;
                        return Poll::Ready(RelayEvent::ClientGone);
                    }
                    let from = if st.c2s.pos == 0 && st.c2s.end == 0 {
                        0
                    } else {
                        from
                    };
                    st.c2s.end = from + n;
                    if let Err(e) = st.scan_client(from) {
                        return Poll::Ready(RelayEvent::ClientProtocol(e));
                    }
                    if let Err(e) = st.keep_raw(from, &mut server.prepared) {
                        return Poll::Ready(RelayEvent::ServerProtocol(e));
                    }
                    progressed = true;
                }
                Poll::Ready(Err(_)) => {
                    st.client_eof = true;
                    return Poll::Ready(RelayEvent::ClientGone);
                }
                Poll::Pending => {}
            }
        }

        // server -> client
        let limit = st.s2c_limit();
        if limit > st.s2c.pos {
            match Pin::new(&mut *client).poll_write(cx, st.s2c.data_to(limit)) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    st.s2c.consume(n);
                    st.counts.sent += n as u64;
                    progressed = true;
                }
                Poll::Ready(_) => {
                    st.client_eof = true;
                    return Poll::Ready(RelayEvent::ClientGone);
                }
                Poll::Pending => {}
            }
        }
        if !st.s2c.has_spare() && st.s2c_limit() <= st.s2c.pos {
            // A held message cut by the end of a full buffer: room for the rest of it.
            let end = st.s2c.end;
            st.s2c.grow_to(end + 16);
        }
        if st.s2c.has_spare() && st.s2c_limit() <= st.s2c.pos {
            let _ = st.s2c.spare();
            let from = st.s2c.end;
            let mut rb = ReadBuf::new(st.s2c.spare());
            match Pin::new(&mut server.stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(st.server_gone(io::ErrorKind::UnexpectedEof.into()));
                    }
                    let from = if st.s2c.pos == 0 && st.s2c.end == 0 {
                        0
                    } else {
                        from
                    };
                    st.s2c.end = from + n;
                    let scanned = match st.on_held(&mut server.prepared) {
                        Held::No => st.scan_server(from, &mut server.prepared),
                        Held::Wait => Ok(()),
                        Held::Released(r) => r,
                        Held::Stale => {
                            let e = io::ErrorKind::ConnectionAborted.into();
                            return Poll::Ready(st.server_gone(e));
                        }
                    };
                    if let Err(e) = scanned {
                        return Poll::Ready(RelayEvent::ServerProtocol(e));
                    }
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(st.server_gone(e)),
                Poll::Pending => {}
            }
        }

        // TLS may accept bytes without sending them; flush both sides every round so
        // nothing written waits for a next write that may never come. Plain TCP: no-op.
        if let Poll::Ready(Err(e)) = Pin::new(&mut server.stream).poll_flush(cx) {
            return Poll::Ready(st.server_gone(e));
        }
        let client_flushed = match Pin::new(&mut *client).poll_flush(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(_)) => {
                st.client_eof = true;
                return Poll::Ready(RelayEvent::ClientGone);
            }
            Poll::Pending => false,
        };
        if st.is_idle() && client_flushed {
            return Poll::Ready(RelayEvent::Idle);
        }
        if st.terminated && st.c2s.is_empty() && st.pending == 0 && st.s2c.is_empty() {
            return Poll::Ready(RelayEvent::ClientGone);
        }
        if !progressed {
            return Poll::Pending;
        }
    }
}

/// Drains server output (discarding it) until every forwarded batch has its ReadyForQuery.
pub async fn drain_server(server: &mut ServerConn, st: &mut RelayState) -> io::Result<()> {
    st.s2c.clear();
    while st.pending > 0 || !st.sscan.at_boundary() {
        let n = tokio::io::AsyncReadExt::read(&mut server.stream, st.s2c.spare()).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        st.s2c.end = n;
        st.scan_server(0, &mut server.prepared)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        st.s2c.clear();
    }
    st.expect.clear();
    Ok(())
}

/// Sends a simple query on an idle server connection and drains its result.
pub async fn run_internal(
    server: &mut ServerConn,
    st: &mut RelayState,
    sql: &str,
) -> io::Result<()> {
    let mut b = bytes::BytesMut::new();
    protocol::query(&mut b, sql);
    tokio::io::AsyncWriteExt::write_all(&mut server.stream, &b).await?;
    tokio::io::AsyncWriteExt::flush(&mut server.stream).await?;
    st.pending += 1;
    drain_server(server, st).await
}
