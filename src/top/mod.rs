//! `pgsluice top`: a live view for the operator on the box during an incident. It polls the
//! admin API (`/pools`, `/metrics`) and draws pools, active/limit, queue, wait p50/p99, shed
//! and cancel rates, the circuit and every client identity. `--once` prints one frame as text
//! (for scripts, and where there is no terminal).

mod model;
mod ui;

use anyhow::{bail, Context, Result};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::Terminal;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use model::{view, Sample, View};

/// GET `path` from the admin API; the body of a 200 answer.
pub async fn get(admin: SocketAddr, path: &str) -> Result<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("admin API did not answer in 5 s")?
        .with_context(|| format!("admin API at {admin}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or("no answer"));
    }
    Ok(body.to_string())
}

/// One poll of both endpoints.
pub async fn sample(admin: SocketAddr, started: Instant) -> Result<Sample> {
    let pools = get(admin, "/pools").await?;
    let metrics = get(admin, "/metrics").await?;
    Ok(Sample {
        at: started.elapsed(),
        pools: serde_json::from_str(&pools).context("/pools is not JSON")?,
        metrics,
    })
}

/// One frame as text lines, `width` x `height`.
pub fn render_text(v: &View, admin: &str, width: u16, height: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(width, height)).expect("test backend");
    let _ = t.draw(|f| ui::draw(f, v, admin, None));
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let line: String = (0..buf.area.width)
            .map(|x| buf[(x, y)].symbol().to_string())
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub async fn run(admin: SocketAddr, interval: Duration, once: bool) -> Result<()> {
    let started = Instant::now();
    if once {
        // Two polls an interval apart, so rates mean something.
        let a = sample(admin, started).await?;
        tokio::time::sleep(interval).await;
        let b = sample(admin, started).await?;
        print!(
            "{}",
            render_text(&view(Some(&a), &b), &admin.to_string(), 110, 30)
        );
        return Ok(());
    }
    let mut term = ratatui::init();
    let res = live(&mut term, admin, interval, started).await;
    ratatui::restore();
    res
}

async fn live(
    term: &mut ratatui::DefaultTerminal,
    admin: SocketAddr,
    interval: Duration,
    started: Instant,
) -> Result<()> {
    let mut prev: Option<Sample> = None;
    let mut last = View::default();
    loop {
        let err = match sample(admin, started).await {
            Ok(s) => {
                last = view(prev.as_ref(), &s);
                prev = Some(s);
                None
            }
            Err(e) => Some(format!("{e:#}")),
        };
        let name = admin.to_string();
        term.draw(|f| ui::draw(f, &last, &name, err.as_deref()))?;
        // Keys are read on a blocking thread so the runtime keeps polling.
        let quit = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            let until = Instant::now() + interval;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if event::poll(left)? {
                    if let Event::Key(k) = event::read()? {
                        let ctrl_c = k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL);
                        if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                            return Ok(true);
                        }
                    }
                }
            }
            Ok(false)
        })
        .await??;
        if quit {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_shows_levels_pools_and_identities() {
        let v = View {
            upstream: "127.0.0.1:5432".into(),
            upstream_up: true,
            active: 4,
            limit: 4,
            queued: 7,
            circuit: "closed".into(),
            clients: 11,
            clients_waiting: 7,
            pools: vec![model::PoolRow {
                name: "app/app".into(),
                active: 4,
                queued: 7,
                leased: 4,
                capacity: 4,
                servers: 4,
                idle: 0,
                wait_p50_ms: Some(25.0),
                wait_p99_ms: Some(f64::INFINITY),
                shed_per_s: 1.5,
            }],
            identities: vec![model::IdentityRow {
                name: "checkout".into(),
                active: 3,
                queued: 2,
                weight: 3,
                admitted_per_s: 12.0,
                shed_per_s: 0.5,
            }],
            ..Default::default()
        };
        let text = render_text(&v, "127.0.0.1:9930", 110, 20);
        assert!(
            text.contains("active 4/4  queued 7  clients 11 (7 waiting)"),
            "{text}"
        );
        assert!(text.contains("active/limit 100%"), "{text}");
        let pool = text.lines().find(|l| l.contains("app/app")).expect(&text);
        for want in ["4/4", "4 (0 idle)", "25", "> max", "1.5"] {
            assert!(pool.contains(want), "{want:?} in {pool:?}");
        }
        let ident = text.lines().find(|l| l.contains("checkout")).expect(&text);
        assert!(ident.contains("12.0") && ident.contains("0.5"), "{ident}");
    }
}
