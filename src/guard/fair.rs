//! Weighted fair sharing of slots between client identities.

use super::Map;
use std::collections::VecDeque;
use std::sync::Arc;

use super::config::GuardConfig;

/// Idle identities are forgotten once this many are known, so arbitrary
/// `application_name`s cannot grow the table without bound.
const MAX_IDENTITIES: usize = 4096;

pub(crate) struct Ident {
    pub weight: u32,
    pub active: usize,
    pub queue: VecDeque<u64>,
    pub admitted_total: u64,
    pub shed_total: u64,
    /// Waiters of this identity inside an open transaction (they queue apart).
    pub tx_queued: usize,
    /// The pool it was first seen in, whose `share` is its weight unless `--share` names it.
    pub pool: Arc<str>,
}

pub(crate) fn ident_entry<'a>(
    idents: &'a mut Map<Arc<str>, Ident>,
    name: &Arc<str>,
    cfg: &GuardConfig,
    pool: &Arc<str>,
    pool_share: Option<u32>,
) -> &'a mut Ident {
    if !idents.contains_key(&**name) {
        if idents.len() >= MAX_IDENTITIES {
            idents.retain(|k, i| {
                i.active > 0
                    || !i.queue.is_empty()
                    || i.tx_queued > 0
                    || cfg.shares.contains_key(&**k)
            });
        }
        let ident = Ident {
            weight: cfg.weight_of(name, pool_share),
            active: 0,
            queue: VecDeque::new(),
            admitted_total: 0,
            shed_total: 0,
            tx_queued: 0,
            pool: pool.clone(),
        };
        idents.insert(name.clone(), ident);
    }
    idents
        .get_mut(&**name)
        .expect("identity entry just ensured")
}

/// Next non-transaction waiter: the backlogged identity with the smallest active/weight
/// (ties to the oldest head, or the newest tail under LIFO), then its oldest waiter, or its
/// newest when `lifo`.
pub(crate) fn pick(
    backlogged: &[Arc<str>],
    idents: &Map<Arc<str>, Ident>,
    lifo: bool,
    eligible: impl Fn(u64) -> bool,
) -> Option<u64> {
    let mut best: Option<(&Ident, u64)> = None;
    for name in backlogged {
        let Some(i) = idents.get(&**name) else {
            continue;
        };
        // A waiter whose pool has no server connection to spare cannot use a slot; the
        // next one of the identity (another pool) may.
        let cand = if lifo {
            i.queue.iter().rev().find(|&&id| eligible(id))
        } else {
            i.queue.iter().find(|&&id| eligible(id))
        };
        let Some(&cand) = cand else { continue };
        let better = match best {
            None => true,
            Some((b, bid)) => {
                let lhs = i.active as u128 * b.weight as u128;
                let rhs = b.active as u128 * i.weight as u128;
                lhs < rhs || (lhs == rhs && if lifo { cand > bid } else { cand < bid })
            }
        };
        if better {
            best = Some((i, cand));
        }
    }
    best.map(|(_, id)| id)
}
