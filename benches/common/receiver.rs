//! The benchmarks' HTTP receiver: answers 200 at once and records, per listener path
//! `/hook/{n}`, every CloudEvent id with its receipt time and latencies.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;

/// What one listener's endpoint has seen since the last reset.
#[derive(Default)]
pub struct ListenerStats {
    pub requests: u64,
    pub ids: HashSet<uuid::Uuid>,
    /// Earliest CloudEvents `time` (commit time), epoch seconds.
    pub first_commit: Option<f64>,
    /// First and latest receipt, epoch seconds.
    pub first_receipt: Option<f64>,
    pub last_receipt: Option<f64>,
    /// Receipt − commit time (ms), first receipt of each event.
    pub commit_latency_ms: Vec<f64>,
    /// Receipt − `clock_timestamp()` of the INSERT (ms), first receipt of each event.
    pub insert_latency_ms: Vec<f64>,
    pub bad: u64,
}

#[derive(Default)]
pub struct Receiver {
    pub listeners: Mutex<Vec<ListenerStats>>,
}

impl Receiver {
    pub fn reset(&self, listeners: usize) {
        let mut l = self.listeners.lock().unwrap();
        l.clear();
        l.resize_with(listeners, ListenerStats::default);
    }

    pub fn unique(&self) -> Vec<u64> {
        let l = self.listeners.lock().unwrap();
        l.iter().map(|s| s.ids.len() as u64).collect()
    }
}

pub fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

async fn hook(
    State(rx): State<Arc<Receiver>>,
    Path(listener): Path<usize>,
    body: Bytes,
) -> StatusCode {
    let now = epoch_secs(SystemTime::now());
    let parsed: Option<(uuid::Uuid, f64, Option<f64>)> = (|| {
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let id = v.get("id")?.as_str()?.parse().ok()?;
        let time = parse_rfc3339(v.get("time")?.as_str()?)?;
        let inserted = v.pointer("/data/row/c").and_then(|c| c.as_f64());
        Some((id, time, inserted))
    })();
    let mut all = rx.listeners.lock().unwrap();
    let Some(stats) = all.get_mut(listener) else {
        return StatusCode::OK;
    };
    stats.requests += 1;
    let Some((id, time, inserted)) = parsed else {
        stats.bad += 1;
        return StatusCode::OK;
    };
    if stats.ids.insert(id) {
        stats.first_commit = Some(stats.first_commit.map_or(time, |f| f.min(time)));
        stats.commit_latency_ms.push((now - time) * 1000.0);
        if let Some(at) = inserted {
            stats.insert_latency_ms.push((now - at) * 1000.0);
        }
    }
    stats.first_receipt = Some(stats.first_receipt.map_or(now, |f| f.min(now)));
    stats.last_receipt = Some(stats.last_receipt.map_or(now, |l| l.max(now)));
    StatusCode::OK
}

/// `2024-05-01T12:34:56.123456Z` as epoch seconds.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let min: i64 = t.next()?.parse().ok()?;
    let sec: f64 = t.next()?.parse().ok()?;
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

/// Starts the receiver on `rt`; returns it and its port.
pub fn start(rt: &tokio::runtime::Runtime) -> (Arc<Receiver>, u16) {
    let receiver = Arc::new(Receiver::default());
    let app = Router::new()
        .route("/hook/{listener}", post(hook))
        .with_state(receiver.clone());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind receiver");
    let port = listener.local_addr().expect("receiver address").port();
    rt.spawn(async move { axum::serve(listener, app).await });
    (receiver, port)
}
