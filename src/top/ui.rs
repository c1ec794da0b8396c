//! Drawing a [`View`]: a header line per upstream, then pools and client identities.

use super::model::View;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Row, Table};
use ratatui::Frame;

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.is_infinite() => "> max".into(),
        Some(x) if x < 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.0}"),
    }
}

pub fn draw(f: &mut Frame, v: &View, admin: &str, error: Option<&str>) {
    let [head, gauge, pools, idents, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(f.area());

    let state = |on: bool, yes: &'static str, no: &'static str, bad: bool| {
        let style = if on == bad {
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::default().fg(Color::Green)
        };
        Span::styled(if on { yes } else { no }, style)
    };
    let circuit_ok = v.circuit == "closed";
    let header = vec![
        Line::from(vec![
            Span::styled(
                "pgsluice top",
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!("  upstream {}  ", v.upstream)),
            state(v.upstream_up, "up", "DOWN", false),
            Span::raw("  circuit "),
            state(circuit_ok, "closed", "OPEN", false),
            Span::raw("  "),
            state(v.paused, "PAUSED", "serving", true),
            Span::raw(if v.standing_queue {
                "  STANDING QUEUE"
            } else {
                ""
            }),
        ]),
        Line::from(format!(
            "active {}/{}  queued {}  clients {} ({} waiting)  cancels {:.1}/s",
            v.active, v.limit, v.queued, v.clients, v.clients_waiting, v.cancels_per_s
        )),
    ];
    f.render_widget(Paragraph::new(header), head);
    let ratio = if v.limit == 0 {
        0.0
    } else {
        (v.active as f64 / v.limit as f64).min(1.0)
    };
    f.render_widget(
        Gauge::default()
            .gauge_style(Style::default().fg(if ratio >= 0.9 {
                Color::Red
            } else {
                Color::Cyan
            }))
            .ratio(ratio)
            .label(format!("active/limit {:.0}%", ratio * 100.0)),
        gauge,
    );

    let rows = v.pools.iter().map(|p| {
        Row::new(vec![
            p.name.clone(),
            format!("{}", p.active),
            format!("{}", p.queued),
            format!("{}/{}", p.leased, p.capacity),
            format!("{} ({} idle)", p.servers, p.idle),
            ms(p.wait_p50_ms),
            ms(p.wait_p99_ms),
            format!("{:.1}", p.shed_per_s),
        ])
    });
    let widths = [
        Constraint::Min(16),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(14),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(8),
    ];
    let header = Row::new([
        "pool", "active", "queued", "leased", "servers", "wait p50", "wait p99", "shed/s",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    f.render_widget(
        Table::new(rows, widths).header(header).block(
            Block::default()
                .borders(Borders::TOP)
                .title(" pools (wait in ms) "),
        ),
        pools,
    );

    let rows = v.identities.iter().map(|i| {
        Row::new(vec![
            i.name.clone(),
            format!("{}", i.active),
            format!("{}", i.queued),
            format!("{}", i.weight),
            format!("{:.1}", i.admitted_per_s),
            format!("{:.1}", i.shed_per_s),
        ])
    });
    let widths = [
        Constraint::Min(16),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(11),
        Constraint::Length(8),
    ];
    let header = Row::new([
        "identity",
        "active",
        "queued",
        "weight",
        "admitted/s",
        "shed/s",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    f.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::TOP).title(" identities ")),
        idents,
    );
    let foot_text = match error {
        Some(e) => Line::styled(format!("{admin}: {e}"), Style::default().fg(Color::Red)),
        None => Line::from(format!("{admin}  q: quit")),
    };
    f.render_widget(Paragraph::new(foot_text), foot);
}
