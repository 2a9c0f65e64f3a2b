//! Where the CPU worker threads run: pinned one per CPU, or left to the
//! OS scheduler.
//!
//! Why pin: between calls the pool's idle threads spin with
//! `sched_yield`. Measured on a 2-vCPU VM, the scheduler then often woke
//! both workers on one CPU while the other sat idle, so a call split in
//! two halves ran them one after the other (75 of 100 traced calls): a
//! 0.45 ms decode took 0.9–1.06 ms. Pinned, no traced call ran its halves
//! one after the other (BENCHMARKS.md, "Ninth session").
//!
//! Pinning also has a cost: a pinned thread cannot move away from a CPU
//! that something else keeps busy. So `Auto` pins only when the pool has
//! exactly one thread per CPU the process may use (its affinity mask), as
//! the default thread count gives; a smaller pool, or one in a container
//! whose CPU quota is below its mask, is left unpinned.

use crate::error::{Error, Result};

/// How to place the worker threads (`mlart_engine_options.thread_affinity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Affinity {
    /// Pin when the pool has one thread per CPU of the process's mask.
    #[default]
    Auto,
    /// Never pin.
    None,
    /// Pin thread `i` to the `i`-th CPU of the mask (round robin when the
    /// pool has more threads than the mask has CPUs).
    Pin,
}

impl Affinity {
    /// From the C enum (`MLART_AFFINITY_*`); `arg` names the argument.
    pub fn from_raw(arg: &str, raw: u32) -> Result<Self> {
        match raw {
            0 => Ok(Affinity::Auto),
            1 => Ok(Affinity::None),
            2 => Ok(Affinity::Pin),
            _ => Err(Error::invalid(format!(
                "{arg} = {raw} is not a valid mlart_thread_affinity (AUTO=0, NONE=1, PIN=2)"
            ))),
        }
    }

    /// From `MLART_CPU_AFFINITY` (`auto`, `none` or `pin`).
    pub fn from_env(value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Affinity::Auto),
            "none" => Ok(Affinity::None),
            "pin" => Ok(Affinity::Pin),
            _ => Err(Error::invalid(format!(
                "MLART_CPU_AFFINITY = \"{value}\" is not one of auto, none, pin"
            ))),
        }
    }
}

/// The decision for a pool: the CPU of each thread (`None`: unpinned) and
/// why, for `mlart_engine_info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub cpus: Option<Vec<usize>>,
    pub why: String,
}

/// Decides where `threads` workers go, given the CPUs the process may run
/// on (`mask`, ascending; `None` where the OS cannot tell or pin).
pub fn place(request: Affinity, threads: usize, mask: Option<&[usize]>) -> Placement {
    let unpinned = |why: String| Placement { cpus: None, why };
    let mask = match (request, mask.filter(|m| !m.is_empty())) {
        (Affinity::None, _) => return unpinned("not pinned (affinity NONE)".into()),
        (_, None) => return unpinned("not pinned (this OS gives no CPU affinity)".into()),
        (_, Some(mask)) => mask,
    };
    if request == Affinity::Auto {
        if threads != mask.len() {
            return unpinned(format!(
                "not pinned (auto: {threads} threads for the {} CPUs this process may use; \
                 pinning pays when the pool has one thread per CPU)",
                mask.len()
            ));
        }
        if threads < 2 {
            return unpinned("not pinned (auto: one thread)".into());
        }
    }
    let cpus: Vec<usize> = (0..threads).map(|i| mask[i % mask.len()]).collect();
    let how = match request {
        Affinity::Auto => "auto: one thread per CPU of the process's mask",
        _ => "affinity PIN",
    };
    Placement {
        why: format!("pinned to CPUs {} ({how})", list(&cpus)),
        cpus: Some(cpus),
    }
}

/// `0,1,2` for the reason string.
fn list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The CPUs the calling thread may run on, ascending (`None` off Linux or
/// if the OS refuses to tell).
pub fn process_mask() -> Option<Vec<usize>> {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is the calling thread; the size is that of `set`.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return None;
        }
        let n = libc::CPU_SETSIZE as usize;
        // SAFETY: CPU_ISSET reads bit c < CPU_SETSIZE of an initialized set.
        Some(
            (0..n)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect(),
        )
    }
    #[cfg(not(all(target_os = "linux", not(miri))))]
    None
}

/// Restricts the calling thread to `cpus` (pin: one CPU; undo: the
/// process mask); the OS error if it refuses.
pub fn set_thread_cpus(cpus: &[usize]) -> std::result::Result<(), String> {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            if cpu >= libc::CPU_SETSIZE as usize {
                return Err(format!("CPU {cpu} is beyond CPU_SETSIZE"));
            }
            // SAFETY: cpu < CPU_SETSIZE (checked above).
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        // SAFETY: pid 0 is the calling thread; the size is that of `set`.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(())
    }
    #[cfg(not(all(target_os = "linux", not(miri))))]
    Err(format!(
        "cannot restrict a thread to CPUs {}: this OS gives no CPU affinity",
        list(cpus)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pins_only_a_pool_of_one_thread_per_cpu() {
        let mask = [0, 1, 4, 5];
        let p = place(Affinity::Auto, 4, Some(&mask));
        assert_eq!(p.cpus, Some(vec![0, 1, 4, 5]));
        assert!(p.why.contains("pinned to CPUs 0,1,4,5"), "{}", p.why);
        for threads in [1, 2, 3, 5, 8] {
            let p = place(Affinity::Auto, threads, Some(&mask));
            assert_eq!(p.cpus, None, "{threads} threads");
            assert!(p.why.starts_with("not pinned"), "{}", p.why);
        }
        assert_eq!(place(Affinity::Auto, 1, Some(&[3])).cpus, None);
    }

    #[test]
    fn pin_and_none_do_what_they_say() {
        let mask = [2, 3];
        assert_eq!(place(Affinity::Pin, 1, Some(&mask)).cpus, Some(vec![2]));
        assert_eq!(
            place(Affinity::Pin, 5, Some(&mask)).cpus,
            Some(vec![2, 3, 2, 3, 2])
        );
        assert_eq!(place(Affinity::None, 2, Some(&mask)).cpus, None);
        for a in [Affinity::Auto, Affinity::None, Affinity::Pin] {
            for m in [None, Some(&[][..])] {
                let p = place(a, 2, m);
                assert_eq!(p.cpus, None);
                let want = if a == Affinity::None {
                    "affinity NONE"
                } else {
                    "no CPU affinity"
                };
                assert!(p.why.contains(want), "{}", p.why);
            }
        }
    }

    #[test]
    fn names_and_raw_values() {
        assert_eq!(Affinity::from_raw("a", 0).unwrap(), Affinity::Auto);
        assert_eq!(Affinity::from_raw("a", 1).unwrap(), Affinity::None);
        assert_eq!(Affinity::from_raw("a", 2).unwrap(), Affinity::Pin);
        let e = Affinity::from_raw("options->thread_affinity", 7).unwrap_err();
        assert!(
            e.message.contains("options->thread_affinity = 7"),
            "{}",
            e.message
        );
        assert_eq!(Affinity::from_env(" PIN ").unwrap(), Affinity::Pin);
        assert_eq!(Affinity::from_env("none").unwrap(), Affinity::None);
        let e = Affinity::from_env("all").unwrap_err();
        assert!(
            e.message.contains("MLART_CPU_AFFINITY = \"all\""),
            "{}",
            e.message
        );
    }

    #[cfg(all(target_os = "linux", not(miri)))]
    #[test]
    fn pinning_a_thread_changes_its_mask() {
        let mask = process_mask().expect("Linux reports the affinity mask");
        assert!(!mask.is_empty());
        let cpu = *mask.last().unwrap();
        let all = mask.clone();
        let seen = std::thread::spawn(move || {
            set_thread_cpus(&[cpu]).expect("pin to a CPU of the mask");
            let pinned = process_mask();
            set_thread_cpus(&all).expect("undo the pin");
            (pinned, process_mask())
        })
        .join()
        .unwrap();
        assert_eq!(seen, (Some(vec![cpu]), Some(mask)));
        assert!(set_thread_cpus(&[usize::MAX]).is_err());
        assert!(set_thread_cpus(&[]).is_err(), "an empty set is refused");
    }
}
