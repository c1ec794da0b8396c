//! Admission control. (Interim semaphore; replaced by the full guard.)
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone, Debug, Default)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub base_cooldown: Duration,
    pub max_cooldown: Duration,
}
#[derive(Clone, Debug, Default)]
pub struct GuardConfig {
    pub upstream: String,
    pub max_active: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub shares: HashMap<String, u32>,
    pub breaker: BreakerConfig,
}
pub struct Guard {
    sem: Arc<Semaphore>,
    cfg: GuardConfig,
}
pub struct AdmitRequest {
    pub pool: Arc<str>,
    pub identity: Arc<str>,
    pub client_id: u64,
    pub in_transaction: bool,
    pub last_admitted: Option<Instant>,
    pub deadline: Option<Instant>,
}
pub struct Permit {
    _p: OwnedSemaphorePermit,
    waited: Duration,
}
impl Permit {
    pub fn waited(&self) -> Duration {
        self.waited
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    QueueFull,
    StandingQueue,
    QueueTimeout,
    Cohort,
    CircuitOpen,
    Paused,
}
impl ShedReason {
    pub fn as_str(&self) -> &'static str {
        "queue_timeout"
    }
    pub fn sqlstate(&self) -> &'static str {
        "53400"
    }
}
#[derive(Debug, Clone)]
pub struct Shed {
    pub reason: ShedReason,
    pub waited: Duration,
    pub active: usize,
    pub limit: usize,
    pub queued: usize,
}
impl Shed {
    pub fn message(&self) -> String {
        "pgsluice: database busy".into()
    }
    pub fn hint(&self) -> String {
        format!("waited {} ms", self.waited.as_millis())
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}
impl CircuitState {
    pub fn as_gauge(&self) -> f64 {
        0.0
    }
}
impl Guard {
    pub fn new(cfg: GuardConfig) -> Arc<Guard> {
        Arc::new(Guard {
            sem: Arc::new(Semaphore::new(cfg.max_active)),
            cfg,
        })
    }
    pub async fn admit(self: &Arc<Self>, _req: AdmitRequest) -> Result<Permit, Shed> {
        let t = Instant::now();
        match tokio::time::timeout(self.cfg.queue_timeout, self.sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Permit {
                _p: p,
                waited: t.elapsed(),
            }),
            _ => Err(Shed {
                reason: ShedReason::QueueTimeout,
                waited: t.elapsed(),
                active: 0,
                limit: 0,
                queued: 0,
            }),
        }
    }
    pub fn update_config(&self, _cfg: GuardConfig) {}
    pub fn pause(&self) {}
    pub fn resume(&self) {}
    pub fn is_paused(&self) -> bool {
        false
    }
    pub fn record_success(&self) {}
    pub fn record_failure(&self) {}
    pub fn circuit_state(&self) -> CircuitState {
        CircuitState::Closed
    }
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({})
    }
}
