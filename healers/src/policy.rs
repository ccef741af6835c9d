//! Diagnosis: who is to blame, from the process table. Pure functions, so every policy is tested
//! without a guest.
//!
//! Never wrong-kill: what [`introspect::repair::killable`] refuses (root and the kernel, kernel
//! threads, init, spared users) is never a candidate; a policy whose answer is not clear (no user well ahead of the others) names
//! nobody, and the healer then reports and does nothing.

use std::collections::{BTreeMap, HashMap, HashSet};

use introspect::repair::{killable, Spared};
use introspect::tasks::Process;
use serde::Serialize;

/// The top user must have at least this many processes for TOO_MANY_PROCS to name them.
pub const MIN_PROCS: u64 = 10;
/// ... and at least this many times the runner-up's.
pub const LEAD: u64 = 2;
/// TREE_TOO_DEEP: the deepest tree must be at least this deep, and this much deeper than the
/// runner-up's.
pub const MIN_DEPTH: u64 = 5;
/// See [`MIN_DEPTH`].
pub const DEPTH_LEAD: u64 = 3;

/// A user to blame, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Culprit {
    /// The user.
    pub uid: u32,
    /// The policy that named them.
    pub policy: &'static str,
    /// The figure that decided (processes, forks/s, depth, pages).
    pub score: u64,
    /// The runner-up's figure.
    pub runner_up: u64,
}

/// The user with the highest `score`, if clearly ahead: at least `min`, and at least `lead` times
/// the runner-up (`lead_add` more, for additive margins).
fn clear_winner(
    scores: &BTreeMap<u32, u64>,
    min: u64,
    lead: u64,
    lead_add: u64,
    policy: &'static str,
) -> Option<Culprit> {
    let mut v: Vec<(u32, u64)> = scores.iter().map(|(u, s)| (*u, *s)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let (uid, score) = *v.first()?;
    let runner_up = v.get(1).map(|x| x.1).unwrap_or(0);
    let clear = score >= min
        && score >= runner_up.saturating_mul(lead)
        && score >= runner_up.saturating_add(lead_add)
        && score > runner_up;
    clear.then_some(Culprit {
        uid,
        policy,
        score,
        runner_up,
    })
}

/// TOO_MANY_PROCS: the user with the most processes (thread groups).
pub fn too_many_procs(table: &[Process], spared: &Spared) -> Option<Culprit> {
    let mut n = BTreeMap::new();
    for p in table.iter().filter(|p| killable(p, spared)) {
        *n.entry(p.task.uid).or_insert(0u64) += 1;
    }
    clear_winner(&n, MIN_PROCS, LEAD, 1, "TOO_MANY_PROCS")
}

/// TREE_TOO_DEEP: the user owning the deepest process tree.
pub fn tree_too_deep(table: &[Process], spared: &Spared) -> Option<Culprit> {
    let mut d = BTreeMap::new();
    for p in table.iter().filter(|p| killable(p, spared)) {
        let e = d.entry(p.task.uid).or_insert(0u64);
        *e = (*e).max(u64::from(p.depth));
    }
    clear_winner(&d, MIN_DEPTH, 1, DEPTH_LEAD, "TREE_TOO_DEEP")
}

/// RATE_TOO_HIGH: the user forking fastest, above `threshold` forks/s. `rates` are `(uid, forks in
/// the last 1 s window)`, from the kernel's per-user fork table (patched guests: every fork counts,
/// even of processes already gone) or, on stock kernels, from live processes started in the last
/// second.
pub fn rate_too_high(rates: &[(u32, u64)], threshold: u64, spared: &Spared) -> Option<Culprit> {
    let mut r = BTreeMap::new();
    for &(uid, rate) in rates {
        if !spared.contains(uid) {
            let e = r.entry(uid).or_insert(0u64);
            *e = (*e).max(rate);
        }
    }
    clear_winner(&r, threshold.saturating_add(1), LEAD, 1, "RATE_TOO_HIGH")
}

/// Live processes per user started within `window_ns` of the newest one: the stock-kernel stand-in
/// for the kernel's fork counters (processes that already exited are missed).
pub fn recent_starts(table: &[Process], window_ns: u64) -> Vec<(u32, u64)> {
    let newest = table.iter().map(|p| p.task.start_time).max().unwrap_or(0);
    let mut n: HashMap<u32, u64> = HashMap::new();
    for p in table {
        if !p.task.kthread && newest.saturating_sub(p.task.start_time) <= window_ns {
            *n.entry(p.task.uid).or_insert(0) += 1;
        }
    }
    n.into_iter().collect()
}

/// Resident pages of a process.
pub fn rss(p: &Process) -> u64 {
    p.task.rss_anon + p.task.rss_file + p.task.rss_shmem
}

/// Resident pages per killable user.
fn rss_by_uid(table: &[Process], spared: &Spared) -> BTreeMap<u32, u64> {
    let mut r = BTreeMap::new();
    for p in table.iter().filter(|p| killable(p, spared)) {
        *r.entry(p.task.uid).or_insert(0u64) += rss(p);
    }
    r
}

/// MAX_RSSUID (and MAX_RSSUID_SAVEUID, with `save` added to `spared`): the user whose processes
/// hold the most resident memory — if they hold at least `min_pages` (a user with less is no
/// memory hog, whatever the sensors say: low free memory on a guest full of page cache is not
/// the fault of its small services) and a clear lead.
pub fn max_rss_uid(table: &[Process], spared: &Spared, min_pages: u64) -> Option<Culprit> {
    // A clear lead in memory: the top user holds at least 1.5x the runner-up.
    let mut v: Vec<(u32, u64)> = rss_by_uid(table, spared).into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let (uid, score) = *v.first()?;
    let runner_up = v.get(1).map(|x| x.1).unwrap_or(0);
    (score >= min_pages.max(257)
        && score.saturating_mul(2) >= runner_up.saturating_mul(3)
        && score > runner_up)
        .then_some(Culprit {
            uid,
            policy: "MAX_RSSUID",
            score,
            runner_up,
        })
}

/// MAX_RSS: the process holding the most resident memory, with its ancestors of the same user up
/// to (not including) init or another user's process — the controller that would respawn it;
/// only if its user holds at least `min_pages` in all (see [`max_rss_uid`]).
pub fn max_rss(table: &[Process], spared: &Spared, min_pages: u64) -> Option<(Culprit, Vec<u32>)> {
    let victim = table
        .iter()
        .filter(|p| killable(p, spared))
        .max_by_key(|p| (rss(p), std::cmp::Reverse(p.task.pid)))?;
    let user_pages = rss_by_uid(table, spared)
        .get(&victim.task.uid)
        .copied()
        .unwrap_or(0);
    if rss(victim) <= 256 || user_pages < min_pages {
        return None;
    }
    let by_pid: HashMap<u32, &Process> = table.iter().map(|p| (p.task.pid, p)).collect();
    let mut pids = vec![victim.task.pid];
    // A set beside the list: a hostile guest's 65,536-long chain must not cost a quadratic scan.
    let mut seen: HashSet<u32> = pids.iter().copied().collect();
    let mut cur = victim;
    for _ in 0..table.len() {
        match by_pid.get(&cur.task.ppid) {
            Some(parent) if killable(parent, spared) && parent.task.uid == victim.task.uid => {
                if !seen.insert(parent.task.pid) {
                    break;
                }
                pids.push(parent.task.pid);
                cur = parent;
            }
            _ => break,
        }
    }
    let runner_up = table
        .iter()
        .filter(|p| killable(p, spared) && p.task.pid != victim.task.pid)
        .map(rss)
        .max()
        .unwrap_or(0);
    Some((
        Culprit {
            uid: victim.task.uid,
            policy: "MAX_RSS",
            score: rss(victim),
            runner_up,
        },
        pids,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use introspect::tasks::Task;

    pub(crate) fn proc(pid: u32, ppid: u32, uid: u32, depth: u32, rss: u64) -> Process {
        Process {
            task: Task {
                addr: 0,
                pid,
                tgid: pid,
                ppid,
                uid,
                euid: uid,
                comm: format!("p{pid}"),
                state: 'R',
                kthread: false,
                start_time: u64::from(pid) * 1_000_000,
                cpu_ns: 0,
                rss_file: 0,
                rss_anon: rss,
                rss_shmem: 0,
            },
            threads: vec![],
            thread_addrs: vec![],
            depth,
            children: 0,
            cpu_ns: 0,
        }
    }

    fn base() -> Vec<Process> {
        let mut t = vec![proc(1, 0, 0, 1, 100)];
        let mut k = proc(2, 0, 0, 1, 0);
        k.task.kthread = true;
        t.push(k);
        t.push(proc(10, 1, 1001, 2, 500)); // useful, user2
        t
    }

    #[test]
    fn too_many_procs_names_the_bomber_and_only_when_clear() {
        let mut t = base();
        assert_eq!(too_many_procs(&t, &Spared::root()), None, "nobody");
        for pid in 100..150 {
            t.push(proc(pid, 99, 1000, 3, 10));
        }
        let c = too_many_procs(&t, &Spared::root()).unwrap();
        assert_eq!((c.uid, c.score, c.runner_up), (1000, 50, 1));
        // Spared users are never named.
        assert_eq!(too_many_procs(&t, &Spared::new([1000])), None);
        // Two users at par: no clear culprit.
        for pid in 200..240 {
            t.push(proc(pid, 99, 1002, 3, 10));
        }
        assert_eq!(too_many_procs(&t, &Spared::root()), None);
        // Root's processes never count.
        let mut r = base();
        for pid in 100..200 {
            r.push(proc(pid, 1, 0, 2, 1));
        }
        assert_eq!(too_many_procs(&r, &Spared::root()), None);
    }

    #[test]
    fn tree_too_deep_needs_a_clear_lead() {
        let mut t = base();
        for (i, pid) in (100..112).enumerate() {
            t.push(proc(pid, pid - 1, 1000, 3 + u32::try_from(i).unwrap(), 1));
        }
        let c = tree_too_deep(&t, &Spared::root()).unwrap();
        assert_eq!((c.uid, c.score), (1000, 14));
        t.push(proc(300, 1, 1001, 13, 1));
        assert_eq!(tree_too_deep(&t, &Spared::root()), None);
    }

    #[test]
    fn rate_too_high_respects_threshold_and_spared() {
        let rates = [(1000, 900), (1001, 3), (0, 5000)];
        assert_eq!(
            rate_too_high(&rates, 100, &Spared::root()).unwrap().uid,
            1000
        );
        assert_eq!(rate_too_high(&rates, 1000, &Spared::root()), None);
        assert_eq!(rate_too_high(&rates, 100, &Spared::new([1000])), None);
        let t: Vec<Process> = (100..110).map(|p| proc(p, 1, 1000, 2, 1)).collect();
        let r = recent_starts(&t, 3_000_000);
        assert_eq!(r, vec![(1000, 4)]);
    }

    #[test]
    fn max_rss_takes_the_controller_along_but_never_init_or_another_user() {
        let mut t = base();
        t.push(proc(20, 1, 1000, 2, 50)); // controller
        for pid in 21..51 {
            t.push(proc(pid, 20, 1000, 3, 2048 + u64::from(pid)));
        }
        let (c, pids) = max_rss(&t, &Spared::root(), 256).unwrap();
        assert_eq!(c.uid, 1000);
        assert_eq!(pids, vec![50, 20]);
        let u = max_rss_uid(&t, &Spared::root(), 256).unwrap();
        assert_eq!(u.uid, 1000);
        // With the hog's user spared, the next user is named: sparing is the operator's choice.
        assert_eq!(
            max_rss_uid(&t, &Spared::new([1000]), 256).unwrap().uid,
            1001
        );
        assert_eq!(max_rss(&t, &Spared::new([1000, 1001]), 256), None);
    }

    #[test]
    fn a_user_below_the_floor_is_no_memory_culprit() {
        let mut t = base();
        // A small service (8 MiB) alone, after the hog is gone: not a culprit at a 64 MiB floor.
        t.push(proc(60, 1, 101, 2, 2048));
        let spared = Spared::new([1001]);
        assert_eq!(max_rss_uid(&t, &spared, 16_384), None);
        assert_eq!(max_rss(&t, &spared, 16_384), None);
        assert_eq!(max_rss_uid(&t, &spared, 256).unwrap().uid, 101);
        // 30 hog processes of 9 MiB each (270 MiB) are one.
        for pid in 61..91 {
            t.push(proc(pid, 1, 1000, 2, 2304));
        }
        assert_eq!(max_rss_uid(&t, &spared, 16_384).unwrap().uid, 1000);
        assert_eq!(max_rss(&t, &spared, 16_384).unwrap().0.uid, 1000);
    }
}
