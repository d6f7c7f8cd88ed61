//! A spinning worker team for one-token passes.
//!
//! Generating one token makes a few hundred parallel products of a few microseconds each. On
//! rayon's pool the idle thread goes to sleep between them and is woken by a futex for the next
//! (about 90 sleeps per token on SmolLM2). Inside a [`session`] the products go instead to a
//! team of threads that spin on an atomic counter while the session lasts and park when it
//! ends: one wake per pass, as llama.cpp's thread pool does (Q4_0 generation, 2 threads: faster
//! than rayon in six of six alternating runs once the serial steps between products were cut).
//! Outside a session [`for_chunks`] is rayon's `par_chunks_mut`.
//!
//! Hand-written because rayon has no spin-while-busy mode and no well-kept crate offers a team
//! scoped to one pass that parks between passes.

use rayon::prelude::*;
use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;

/// The job being run: tasks `0..n` of `f`, in `parts` contiguous runs (one claim each, so the
/// threads share a cache line once per run rather than once per task). The pointer is
/// lifetime-erased; [`Shared::run`] does not return before every run that read it has finished.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    parts: usize,
}

struct Shared {
    /// Unclaimed runs of the current job: a claim takes run `remaining - 1`.
    remaining: AtomicUsize,
    /// Finished runs of the current job.
    done: AtomicUsize,
    /// Written by the session's thread only while no task can be claimed; read by a thread only
    /// after it claimed a task (the claim acquires the store of `remaining` that published it).
    job: UnsafeCell<Option<Job>>,
    /// A session is open: workers spin. Otherwise they park.
    active: AtomicBool,
    /// The first panic of a task of the current job, raised again on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is accessed under the claim protocol described on the field.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    fn claim(&self) -> Option<usize> {
        let mut r = self.remaining.load(Acquire);
        while r > 0 {
            match self
                .remaining
                .compare_exchange_weak(r, r - 1, AcqRel, Acquire)
            {
                Ok(_) => return Some(r - 1),
                Err(now) => r = now,
            }
        }
        None
    }

    /// Runs run `k` of the current job (claimed by the caller) and counts it done.
    fn work(&self, k: usize) {
        // SAFETY: a claimed run's job stays in place until its `done` count is seen.
        let j = unsafe { (*self.job.get()).expect("a claimed run has a job") };
        let tasks = k * j.n / j.parts..(k + 1) * j.n / j.parts;
        let run = AssertUnwindSafe(|| tasks.for_each(|i| unsafe { (*j.f)(i) }));
        if let Err(e) = catch_unwind(run) {
            let mut p = self.panic.lock().unwrap_or_else(|p| p.into_inner());
            p.get_or_insert(e);
        }
        self.done.fetch_add(1, Release);
    }

    /// Runs `f(0) .. f(n - 1)` across the team and the calling thread, in `parts` runs.
    fn run(&self, n: usize, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: only the lifetime is erased; every task has finished before this returns.
        let f = unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), *const (dyn Fn(usize) + Sync)>(f)
        };
        let parts = parts.clamp(1, n.max(1));
        unsafe { *self.job.get() = Some(Job { f, n, parts }) };
        self.done.store(0, Relaxed);
        self.remaining.store(parts, Release);
        while let Some(k) = self.claim() {
            self.work(k);
        }
        while self.done.load(Acquire) < parts {
            spin();
        }
        unsafe { *self.job.get() = None };
        let panic = self.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(e) = panic {
            resume_unwind(e);
        }
    }

    fn worker(&self) {
        loop {
            if !self.active.load(Acquire) {
                std::thread::park();
                continue;
            }
            match self.claim() {
                Some(i) => self.work(i),
                None => spin(),
            }
        }
    }
}

/// One wait step. No PAUSE (`spin_loop`): with and without it, alternating runs here showed no
/// difference beyond the noise, and a hypervisor with pause-loop exiting may take a vCPU that
/// keeps pausing off its core (the machines this was measured on are virtual).
#[inline(always)]
fn spin() {}

struct Team {
    shared: Arc<Shared>,
    workers: Vec<Thread>,
    /// One session at a time; a second caller runs on rayon.
    busy: Mutex<()>,
}

static TEAM: OnceLock<Team> = OnceLock::new();

/// Runs per thread in a job: a thread that runs slower leaves runs to the others. With one
/// run each, the caller waited for the team's thread 6.9 % of a Q8_0 generation's samples
/// (that thread's rows took 19 % longer); with four, 2.8 %.
const PARTS: usize = 4;

thread_local! {
    /// The team this thread opened a session on.
    static OPEN: Cell<Option<&'static Team>> = const { Cell::new(None) };
}

impl Team {
    fn new(size: usize) -> Team {
        let shared = Arc::new(Shared {
            remaining: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            active: AtomicBool::new(false),
            panic: Mutex::new(None),
        });
        let workers = (1..size)
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("adaptq-team-{i}"))
                    .spawn(move || s.worker())
                    .expect("spawn a worker thread")
                    .thread()
                    .clone()
            })
            .collect();
        Team {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }
}

/// Closes the session when the body returns or unwinds.
struct Close(&'static Team);

impl Drop for Close {
    fn drop(&mut self) {
        self.0.shared.active.store(false, Release);
        OPEN.with(|o| o.set(None));
    }
}

/// Runs `body` with [`for_chunks`] on the spinning team (as many threads as rayon's current
/// pool, the caller among them; the team is made for the first session's pool). Without a
/// second thread, inside another session, from a pool of another size than the team's, or
/// while another thread holds the team, `body` runs as it is.
pub fn session<R>(body: impl FnOnce() -> R) -> R {
    let n = rayon::current_num_threads();
    if n < 2 || OPEN.with(|o| o.get().is_some()) {
        return body();
    }
    let team = TEAM.get_or_init(|| Team::new(n));
    if team.workers.len() + 1 != n {
        return body();
    }
    session_on(team, body)
}

fn session_on<R>(team: &'static Team, body: impl FnOnce() -> R) -> R {
    let Ok(_held) = team.busy.try_lock() else {
        return body();
    };
    team.shared.active.store(true, Release);
    team.workers.iter().for_each(Thread::unpark);
    OPEN.with(|o| o.set(Some(team)));
    let _close = Close(team);
    body()
}

/// `f(i, chunk i)` for every `chunk`-long piece of `out` (the last may be shorter), in
/// parallel: on the team inside a session, else on rayon's pool.
pub fn for_chunks<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    assert!(chunk > 0, "chunks of no length");
    let Some(team) = OPEN.with(|o| o.get()) else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
        return;
    };
    let (len, base) = (out.len(), Ptr(out.as_mut_ptr()));
    let n = len.div_ceil(chunk);
    let task = |i: usize| {
        let at = i * chunk;
        let base = &base;
        // SAFETY: task `i` alone touches `out[at .. at + chunk]`, inside `out`'s borrow.
        let c = unsafe { std::slice::from_raw_parts_mut(base.0.add(at), chunk.min(len - at)) };
        f(i, c)
    };
    match n {
        0 => {}
        1 => task(0),
        _ => {
            // A task on this thread that asks for chunks of its own runs them on rayon: the
            // team holds one job at a time.
            OPEN.with(|o| o.set(None));
            let _reopen = Reopen(team);
            team.shared.run(n, PARTS * (team.workers.len() + 1), &task)
        }
    }
}

/// Marks the session open on this thread again when a job returns or unwinds.
struct Reopen(&'static Team);

impl Drop for Reopen {
    fn drop(&mut self) {
        OPEN.with(|o| o.set(Some(self.0)));
    }
}

/// A slice's base pointer, handed to the tasks that each write their own part.
struct Ptr<T>(*mut T);
// SAFETY: the tasks write disjoint parts of one `&mut [T]` with `T: Send`.
unsafe impl<T: Send> Sync for Ptr<T> {}

/// Whether this thread has a session open (its products need no other parallel region).
pub fn open() -> bool {
    OPEN.with(|o| o.get().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A team of its own for each test, so the global one's size and other tests' sessions
    /// do not decide what runs where.
    fn team() -> &'static Team {
        Box::leak(Box::new(Team::new(2)))
    }

    fn on_team_thread() -> bool {
        std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("adaptq-team-"))
    }

    /// Every chunk is visited once with its index, inside a session and outside, including a
    /// short last chunk; some run on the team's thread; sessions open again after one closes.
    #[test]
    fn chunks_are_each_run_once() {
        let team = team();
        let fill = |v: &mut Vec<u64>| {
            for_chunks(v, 7, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    *x += (i * 7 + j) as u64 + 1;
                }
            })
        };
        let want: Vec<u64> = (0..1000).map(|i| 50 * (i + 1)).collect();
        for round in 0..3 {
            let mut inside = vec![0u64; 1000];
            session_on(team, || {
                assert!(open());
                for _ in 0..50 {
                    fill(&mut inside);
                }
            });
            assert!(!open());
            assert_eq!(inside, want, "round {round}");
        }
        let mut outside = vec![0u64; 1000];
        for _ in 0..50 {
            fill(&mut outside);
        }
        assert_eq!(outside, want);
        let helped = AtomicBool::new(false);
        session_on(team, || {
            for _ in 0..200 {
                let mut v = [0u8; 2];
                for_chunks(&mut v, 1, |_, _| {
                    if on_team_thread() {
                        helped.store(true, Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_micros(100));
                });
                if helped.load(Relaxed) {
                    break;
                }
            }
        });
        assert!(helped.load(Relaxed), "no task ran on the team's thread");
    }

    /// A task that asks for chunks of its own gets them (on rayon), and the outer job goes on.
    #[test]
    fn chunks_inside_a_task() {
        let mut v = vec![0u32; 64];
        session_on(team(), || {
            for_chunks(&mut v, 16, |_, c| {
                for_chunks(c, 4, |i, d| d.fill(i as u32 + 1));
            });
            assert!(open());
        });
        let want: Vec<u32> = (0..64).map(|i| (i % 16 / 4 + 1) as u32).collect();
        assert_eq!(v, want);
    }

    /// A panicking task's own payload reaches the caller after every other task has finished,
    /// and the team runs the next job.
    #[test]
    fn a_panic_reaches_the_caller() {
        let team = team();
        let r = catch_unwind(AssertUnwindSafe(|| {
            session_on(team, || {
                let mut v = vec![0u8; 64];
                for_chunks(&mut v, 1, |i, _| assert!(i != 13, "task 13"));
            })
        }));
        let e = r.expect_err("the panic is raised");
        let msg = e.downcast_ref::<&str>().copied();
        assert_eq!(msg, Some("task 13"));
        let mut v = vec![0u8; 64];
        session_on(team, || for_chunks(&mut v, 3, |_, c| c.fill(1)));
        assert!(v.iter().all(|&x| x == 1));
    }
}
