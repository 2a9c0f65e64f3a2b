//! Where a CPU kernel's time goes: the time-stamp counter read between the
//! phases of its key tiles (the AMX and the vector kernels; not the scalar
//! reference), summed over every call and worker thread while a caller
//! (`mlart bench`) has switched the count on. Off (the default) a kernel
//! call reads one flag and nothing else.
//!
//! A diagnostic for benchmarks, not part of the C ABI: the count is global,
//! so two processes' worth of engines profiled at once would mix.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// A phase of a kernel's work on one tile of keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The tile's keys in the kernel's form: gathered, or converted (FP8),
    /// where they cannot be read in place (AMX: and the last of the next
    /// tile's prefetch).
    Keys,
    /// `Q · Kᵀ` (with the next tile's prefetch; the vector kernel reading
    /// bf16 keys in place pairs V's rows here too).
    Scores,
    /// The online softmax (AMX: and P packed as the A operand of P·V).
    Softmax,
    /// V's rows interleaved in pairs, P's too (the bf16 operands of P·V;
    /// AMX: only above 16 query rows).
    VPairs,
    /// `O += P · V`.
    Pv,
    /// Per call: the queries packed, O back to rows, normalized.
    Rest,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Keys,
        Phase::Scores,
        Phase::Softmax,
        Phase::VPairs,
        Phase::Pv,
        Phase::Rest,
    ];

    /// A short identifier (JSON keys).
    pub fn key(self) -> &'static str {
        match self {
            Phase::Keys => "keys",
            Phase::Scores => "scores",
            Phase::Softmax => "softmax",
            Phase::VPairs => "v_pairs",
            Phase::Pv => "pv",
            Phase::Rest => "rest",
        }
    }

    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Keys => "keys",
            Phase::Scores => "scores",
            Phase::Softmax => "softmax",
            Phase::VPairs => "V pairs",
            Phase::Pv => "P·V",
            Phase::Rest => "rest",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static SUMS: Sums = Sums::new();
/// When the count started: wall clock and counter, to convert ticks.
static STARTED: Mutex<Option<(Instant, u64)>> = Mutex::new(None);

/// The sums the calls add to.
struct Sums {
    ticks: [AtomicU64; 6],
    tasks: AtomicU64,
    keys: AtomicU64,
    row_keys: AtomicU64,
}

impl Sums {
    const fn new() -> Self {
        Sums {
            ticks: [const { AtomicU64::new(0) }; 6],
            tasks: AtomicU64::new(0),
            keys: AtomicU64::new(0),
            row_keys: AtomicU64::new(0),
        }
    }

    fn clear(&self) {
        for a in self
            .ticks
            .iter()
            .chain([&self.tasks, &self.keys, &self.row_keys])
        {
            a.store(0, Relaxed);
        }
    }

    fn read(&self, ticks_per_second: f64) -> Profile {
        Profile {
            ticks: std::array::from_fn(|i| self.ticks[i].load(Relaxed)),
            tasks: self.tasks.load(Relaxed),
            keys: self.keys.load(Relaxed),
            row_keys: self.row_keys.load(Relaxed),
            ticks_per_second,
        }
    }
}

/// The counter: the time-stamp counter on x86-64 (constant rate on every
/// CPU with AMX), nanoseconds elsewhere.
#[inline(always)]
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: RDTSC exists on every x86-64 CPU and has no side effects.
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static EPOCH: once_cell::sync::Lazy<Instant> = once_cell::sync::Lazy::new(Instant::now);
        EPOCH.elapsed().as_nanos() as u64
    }
}

/// Clears the sums and switches the count on.
pub fn start() {
    SUMS.clear();
    *STARTED.lock() = Some((Instant::now(), ticks()));
    ON.store(true, Relaxed);
}

/// Switches the count off and returns it (all zero if it was never
/// started). Calls still running keep their share out of it.
pub fn stop() -> Profile {
    ON.store(false, Relaxed);
    let (t1, c1) = (Instant::now(), ticks());
    let ticks_per_second = match STARTED.lock().take() {
        Some((t0, c0)) if t1 > t0 => c1.wrapping_sub(c0) as f64 / (t1 - t0).as_secs_f64(),
        _ => 0.0,
    };
    SUMS.read(ticks_per_second)
}

/// What [`stop`] returns: sums over every kernel call (task) of the count.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Counter ticks per [`Phase`], in [`Phase::ALL`]'s order.
    pub ticks: [u64; 6],
    /// Kernel calls (a run of query rows against a range of keys).
    pub tasks: u64,
    /// Keys attended, summed over the calls.
    pub keys: u64,
    /// Query rows times keys, summed over the calls: the FLOPs are
    /// `2 · row_keys · (d_qk + d_v)`.
    pub row_keys: u64,
    /// The counter's rate, measured between [`start`] and [`stop`].
    pub ticks_per_second: f64,
}

impl Profile {
    /// Seconds spent in `phase`, summed over the threads.
    pub fn seconds(&self, phase: Phase) -> f64 {
        self.ticks[phase as usize] as f64 / self.ticks_per_second.max(1.0)
    }

    /// Seconds in the kernel, summed over the threads.
    pub fn total_seconds(&self) -> f64 {
        Phase::ALL.iter().map(|&p| self.seconds(p)).sum()
    }
}

/// One kernel call's stopwatch: [`Laps::lap`] charges the time since the
/// previous lap to a phase; [`Laps::finish`] adds the call to the sums.
pub(crate) struct Laps {
    on: bool,
    last: u64,
    ticks: [u64; 6],
}

impl Laps {
    #[inline]
    pub(crate) fn start() -> Self {
        Self::new(ON.load(Relaxed))
    }

    #[inline]
    fn new(on: bool) -> Self {
        Laps {
            on,
            last: if on { ticks() } else { 0 },
            ticks: [0; 6],
        }
    }

    #[inline(always)]
    pub(crate) fn lap(&mut self, phase: Phase) {
        if self.on {
            let now = ticks();
            self.ticks[phase as usize] += now.wrapping_sub(self.last);
            self.last = now;
        }
    }

    /// Adds the call (`keys` keys against `rows` query rows) to the sums.
    pub(crate) fn finish(self, keys: usize, rows: usize) {
        self.add_to(&SUMS, keys, rows);
    }

    fn add_to(self, sums: &Sums, keys: usize, rows: usize) {
        if self.on {
            for (sum, t) in sums.ticks.iter().zip(self.ticks) {
                sum.fetch_add(t, Relaxed);
            }
            sums.tasks.fetch_add(1, Relaxed);
            sums.keys.fetch_add(keys as u64, Relaxed);
            sums.row_keys.fetch_add((keys * rows) as u64, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(us: u64) {
        let t = Instant::now();
        while t.elapsed().as_micros() < u128::from(us) {
            std::hint::spin_loop();
        }
    }

    /// Laps land in their phases and the sums; a stopwatch made while the
    /// count is off adds nothing. (Sums of its own: the global ones may
    /// see other tests' kernel calls.)
    #[test]
    fn laps_sum_per_phase_only_while_on() {
        let sums = Sums::new();
        let mut off = Laps::new(false);
        busy(100);
        off.lap(Phase::Scores);
        off.add_to(&sums, 10, 10);
        assert_eq!(sums.read(1.0).ticks, [0; 6]);
        assert_eq!(sums.tasks.load(Relaxed), 0);

        let t0 = (Instant::now(), ticks());
        for _ in 0..2 {
            let mut laps = Laps::new(true);
            busy(2000);
            laps.lap(Phase::Scores);
            busy(500);
            laps.lap(Phase::Pv);
            laps.add_to(&sums, 256, 16);
        }
        let rate = ticks().wrapping_sub(t0.1) as f64 / t0.0.elapsed().as_secs_f64();
        let p = sums.read(rate);
        assert_eq!((p.tasks, p.keys, p.row_keys), (2, 512, 8192));
        let (s, pv) = (p.seconds(Phase::Scores), p.seconds(Phase::Pv));
        assert!(
            (3.9e-3..0.5).contains(&s),
            "scores {s} s after two 2 ms laps"
        );
        assert!(
            (0.9e-3..0.5).contains(&pv),
            "P·V {pv} s after two 0.5 ms laps"
        );
        assert!(
            s > 2.0 * pv,
            "scores {s} s against P·V {pv} s (4:1 expected)"
        );
        assert_eq!(p.seconds(Phase::Keys), 0.0);
        assert!((p.total_seconds() - s - pv).abs() < 1e-12);
        sums.clear();
        assert_eq!(sums.read(rate).tasks, 0);
    }

    /// `start` switches the count on (stopwatches made now run), `stop`
    /// off, with the counter's rate measured in between.
    #[test]
    fn start_and_stop_switch_the_count() {
        start();
        assert!(Laps::start().on);
        busy(2000);
        let p = stop();
        assert!(!Laps::start().on);
        // An x86 TSC runs at 0.5..10 GHz; elsewhere the counter is in ns.
        let plausible = if cfg!(target_arch = "x86_64") {
            5e8..1e10
        } else {
            0.9e9..1.1e9
        };
        assert!(
            plausible.contains(&p.ticks_per_second),
            "{} ticks/s",
            p.ticks_per_second
        );
        assert_eq!(stop().ticks_per_second, 0.0, "a second stop has no start");
    }
}
