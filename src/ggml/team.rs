//! A small team of spinning helper threads for the per-token matrix products.
//!
//! Why not rayon alone: decoding one token makes ~120 products of a few hundred microseconds or
//! less each, separated by tens of microseconds of other work. Between two products rayon's
//! idle workers fall asleep, and waking one (a futex and, on a VM, an inter-processor
//! interrupt) takes about as long as the small Q/K/V products themselves, so those ran on one
//! core in practice. A team's helpers spin on a generation counter for a while after each job
//! (as ggml's thread pool does) and so pick up the next product within a fraction of a
//! microsecond; after `SPIN` without work they park on a condition variable.
//!
//! Tasks are claimed from an atomic counter by the caller and the helpers alike, so an uneven
//! split balances itself. One job runs at a time: a caller that finds the team busy (another
//! thread's product, as in the server) is told so and uses rayon instead.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle helper waits for work (spinning, then yielding) before it parks.
const SPIN: Duration = Duration::from_millis(2);
/// How long it spins before it starts yielding its core to other threads between checks.
const SPIN_HOT: Duration = Duration::from_micros(50);

type Job = *const (dyn Fn(usize) + Sync);

#[derive(Clone, Copy)]
struct SendJob(Job, usize);
// SAFETY: the pointee is `Sync` and outlives every use (see `Shared::job`).
unsafe impl Send for SendJob {}

struct Shared {
    /// Bumped once per job; idle helpers wait for it to change.
    generation: AtomicUsize,
    /// The current job and its task count, erased to a raw pointer. A helper joins a job only
    /// under this lock, counting itself in `active`; [`Team::run`] clears the job under it once
    /// every task is claimed and then waits for `active` to drain, so no helper can touch the
    /// closure after `run` returns. The caller never waits for a helper that has not joined:
    /// on a busy machine a helper may not get a core for milliseconds, and the caller then
    /// simply does every task itself.
    job: Mutex<Option<SendJob>>,
    next: AtomicUsize,
    active: AtomicUsize,
    panicked: AtomicBool,
    sleeping: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

pub struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    busy: Mutex<()>,
}

impl Team {
    /// The team for `threads` threads in all (the caller plus `threads − 1` helpers), made on
    /// first use and kept for the process.
    pub fn get(threads: usize) -> Arc<Team> {
        static TEAMS: OnceLock<Mutex<Vec<Arc<Team>>>> = OnceLock::new();
        let mut teams = TEAMS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = teams.iter().find(|t| t.helpers + 1 == threads.max(1)) {
            return t.clone();
        }
        let t = Arc::new(Team::new(threads.max(1) - 1));
        teams.push(t.clone());
        t
    }

    fn new(helpers: usize) -> Team {
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        for i in 0..helpers {
            let s = shared.clone();
            std::thread::Builder::new().name(format!("linly-team-{i}")).spawn(move || helper(&s)).expect("spawning a team thread");
        }
        Team { shared, helpers, busy: Mutex::new(()) }
    }

    /// Runs `f(0..tasks)` over the caller and the helpers and returns when all are done; `false`
    /// (nothing run) when the team is busy with another caller's job.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        if self.helpers == 0 || tasks <= 1 {
            (0..tasks).for_each(f);
            return true;
        }
        // A job that panicked poisons the lock; the team itself is still sound then.
        let _busy = match self.busy.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let s = &*self.shared;
        // SAFETY: erasing the lifetime is sound because this function clears the job and
        // waits until no helper is inside it (`active` = 0) before returning.
        let job: Job = unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f as *const _) };
        {
            let mut j = lock(&s.job);
            s.next.store(0, SeqCst);
            *j = Some(SendJob(job, tasks));
        }
        s.generation.fetch_add(1, SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _g = lock(&s.park);
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| claim(s, f, tasks)));
        *lock(&s.job) = None;
        let mut spins = 0u32;
        while s.active.load(Acquire) != 0 {
            spins += 1;
            if spins < 4096 { std::hint::spin_loop() } else { std::thread::yield_now() }
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a team thread panicked in a matrix product");
        }
        true
    }
}

/// Runs `f` once on each item, over the team of `threads` threads (the caller included), or
/// over rayon when another thread is using the team. Items are handed out one at a time, so
/// uneven ones balance themselves; the lock per item only makes the hand-over safe.
pub fn for_each<T: Send>(threads: usize, items: Vec<T>, f: impl Fn(T) + Sync) {
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let work = |i: usize| {
        let item = lock(&slots[i]).take();
        if let Some(item) = item {
            f(item);
        }
    };
    if !Team::get(threads).run(slots.len(), &work) {
        use rayon::prelude::*;
        (0..slots.len()).into_par_iter().for_each(work);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes tasks until none are left.
fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync), tasks: usize) {
    loop {
        let i = s.next.fetch_add(1, AcqRel);
        if i >= tasks {
            break;
        }
        f(i);
    }
}

fn helper(s: &Shared) {
    let mut seen = 0;
    loop {
        // Spin, then yield, then park, until a new generation appears.
        let t0 = Instant::now();
        let mut spins = 0u32;
        while s.generation.load(Acquire) == seen {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            let waited = t0.elapsed();
            if waited > SPIN {
                let mut g = lock(&s.park);
                s.sleeping.fetch_add(1, SeqCst);
                while s.generation.load(SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleeping.fetch_sub(1, SeqCst);
                break;
            } else if waited > SPIN_HOT {
                std::thread::yield_now();
            }
        }
        seen = s.generation.load(Acquire);
        let job = {
            let j = lock(&s.job);
            if j.is_some() {
                s.active.fetch_add(1, SeqCst);
            }
            *j
        };
        if let Some(SendJob(job, tasks)) = job {
            // SAFETY: `Team::run` keeps the closure alive until `active` is back to 0.
            let f = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| claim(s, f, tasks))).is_err() {
                s.panicked.store(true, SeqCst);
            }
            s.active.fetch_sub(1, Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_and_jobs_follow_each_other() {
        let team = Team::new(2);
        for round in 0..200 {
            let tasks = 1 + round % 17;
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            assert!(team.run(tasks, &|i| {
                hits[i].fetch_add(1, SeqCst);
            }));
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
            if round == 100 {
                // Long enough for the helpers to park: they must wake for the next job.
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(1);
        let r = catch_unwind(AssertUnwindSafe(|| team.run(8, &|i| assert!(i != 5, "task 5"))));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        assert!(team.run(8, &|_| {
            n.fetch_add(1, SeqCst);
        }));
        assert_eq!(n.load(SeqCst), 8);
    }
}
