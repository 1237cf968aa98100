//! The restore policy: what a failed read means to whoever asked, and how long walfs waits
//! before it says so.
//!
//! PostgreSQL reads every failed restore_command (`cp` exits 1 on EIO as on ENOENT) as "this
//! file does not exist". In archive recovery that ends the recovery and promotes the server,
//! losing everything after that point; on a standby it only means "stream instead". So:
//!
//! | failure \ caller ([`Role`]) | recovery | unknown | standby | other |
//! | --- | --- | --- | --- | --- |
//! | store unavailable, local I/O | wait `recovery_timeout`, then stop it | wait `recovery_timeout`, then fail | wait `standby_timeout`, then fail | wait `other_timeout`, then fail |
//! | damaged object | stop it | fail | fail | fail |
//! | no archive there | stop it | fail | fail | fail (absent, on a new archive mounted read-write) |
//!
//! "Absent" is answered only when the store authoritatively said so for an archive whose
//! identity it just confirmed ([`crate::store::Archive::header`]). "Stop it" means FATAL for
//! PostgreSQL: the mount kills the restore_command process, `walfs fetch` exits above 125.
//! Waiting is like an NFS hard mount, with a log line and a metric while it lasts, retrying
//! with backoff; a caller killed meanwhile (`pg_ctl stop`) is answered at once. Nothing here
//! runs on the happy path: the caller's role is read from `/proc` only once a read is slow or
//! has failed.

use crate::caller::{Processes, Role};
use crate::store::{Class, Error};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How long each kind of caller waits for an unavailable store.
#[derive(Clone, Debug)]
pub struct Policy {
    /// A server in archive recovery (None: for ever). Past it walfs stops the recovery.
    pub recovery_timeout: Option<Duration>,
    /// A standby: past it the read fails and the standby streams instead.
    pub standby_timeout: Duration,
    /// Anyone else (an operator's `cp`, scripts): past it the read fails.
    pub other_timeout: Duration,
    /// A read-write mount: an archive with no identity yet is new and empty, and is "absent"
    /// to everyone except a server recovering from it.
    pub empty_if_new: bool,
}

/// A failed attempt, as the policy sees it.
#[derive(Debug)]
pub struct Trouble {
    pub class: Class,
    /// The archive has no identity at all ([`Error::NoArchive`]).
    pub no_archive: bool,
    pub message: String,
    /// The setting to change, if one ([`Error::concerns`]).
    pub concerns: Option<crate::store::Concern>,
}

impl From<&Error> for Trouble {
    fn from(e: &Error) -> Trouble {
        Trouble {
            class: e.class(),
            no_archive: matches!(e, Error::NoArchive(_)),
            message: e.to_string(),
            concerns: e.concerns(),
        }
    }
}

impl Trouble {
    /// A local file failed (the cache, the spool): the store may be fine.
    pub fn local(e: &std::io::Error) -> Trouble {
        Trouble {
            class: Class::Unavailable,
            no_archive: false,
            message: format!("local disk: {e}"),
            concerns: None,
        }
    }
}

/// Why a read gave up. Never "absent".
#[derive(Debug)]
pub struct Refusal {
    pub class: Class,
    pub role: Role,
    pub message: String,
    /// The setting to change, if one.
    pub concerns: Option<crate::store::Concern>,
    /// The caller must end in a way PostgreSQL takes as FATAL: the recovery stops, nothing is
    /// promoted.
    pub fatal: bool,
    /// The caller was killed while it waited; it will never see the answer.
    pub interrupted: bool,
}

/// What to do about one failure.
enum Action {
    Wait,
    Fail,
    Stop,
    Absent,
}

/// Logs at warn for PostgreSQL's reads, at info for anyone else's (an operator's own command
/// ends with the one line that matters).
macro_rules! say {
    ($role:expr, $($arg:tt)+) => {
        if $role == Role::Other {
            tracing::info!($($arg)+)
        } else {
            tracing::warn!($($arg)+)
        }
    };
}

/// How often a waiting read looks at its caller and its deadline.
const TICK: Duration = Duration::from_millis(250);
/// A waiting read says it still waits this often.
const REMIND: Duration = Duration::from_secs(30);

impl Policy {
    /// How long `role` may wait for an unavailable store (None: for ever).
    fn bound(&self, role: Role) -> Option<Duration> {
        match role {
            Role::Recovery | Role::Unknown => self.recovery_timeout,
            Role::Standby => Some(self.standby_timeout),
            Role::Other => Some(self.other_timeout),
        }
    }

    fn action(&self, t: &Trouble, role: Role) -> Action {
        match (t.class, role) {
            (Class::Unavailable, _) => Action::Wait,
            (_, Role::Recovery) => Action::Stop,
            (Class::Misconfigured, Role::Other) if t.no_archive && self.empty_if_new => {
                Action::Absent
            }
            _ => Action::Fail,
        }
    }

    /// Runs `attempt` until it answers (Ok(Some) data, Ok(None) authoritative absence), or
    /// the policy for `pid`'s role gives up. `what` names the file in log lines; `progress`
    /// moves while the store delivers bytes (to anyone), so a slow download is never taken
    /// for a dead store.
    ///
    /// A role's bound counts from the first failure, and, while an attempt runs, from the
    /// last progress: a store that fails, or hangs without sending a byte, for that long is
    /// unavailable.
    pub async fn read<T, F, Fut>(
        &self,
        procs: &dyn Processes,
        pid: u32,
        what: &str,
        progress: &AtomicU64,
        mut attempt: F,
    ) -> Result<Option<T>, Refusal>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, Trouble>>,
    {
        let started = Instant::now();
        let mut role: Option<Role> = None;
        let mut waiting: Option<Waiting> = None;
        let mut backoff = Duration::from_millis(500);
        let mut failing_since: Option<Instant> = None;
        let mut last: Option<Trouble> = None;
        loop {
            // One attempt, watched: one that hangs is bounded like one that failed.
            let fut = attempt();
            tokio::pin!(fut);
            let mut tick = tokio::time::interval_at(Instant::now() + TICK, TICK);
            let mut seen = progress.load(Ordering::Relaxed);
            let mut moved = Instant::now();
            let outcome = loop {
                tokio::select! {
                    r = &mut fut => break r,
                    _ = tick.tick() => {
                        let r = *role.get_or_insert_with(|| procs.role(pid));
                        if let Some(stop) = self.interrupted(procs, pid, r, what) {
                            return Err(stop);
                        }
                        let now = progress.load(Ordering::Relaxed);
                        if now != seen {
                            (seen, moved) = (now, Instant::now());
                        }
                        if let Some(bound) = self.bound(r).filter(|b| moved.elapsed() >= *b) {
                            let message = match &last {
                                Some(t) => format!("{} (then no answer for {bound:?})", t.message),
                                None => format!("the archive sent nothing for {bound:?}"),
                            };
                            let t = Trouble { class: Class::Unavailable, no_archive: false, message, concerns: None };
                            return Err(self.give_up(r, t, r == Role::Recovery, what));
                        }
                    }
                }
            };
            let trouble = match outcome {
                Ok(v) => {
                    if let Some(w) = waiting.take() {
                        say!(w.role, file = what, role = %w.role, waited = ?started.elapsed(),
                            "the archive answers again");
                    }
                    return Ok(v);
                }
                Err(t) => t,
            };
            let r = *role.get_or_insert_with(|| procs.role(pid));
            match self.action(&trouble, r) {
                Action::Absent => return Ok(None),
                Action::Fail => return Err(self.give_up(r, trouble, false, what)),
                Action::Stop => return Err(self.give_up(r, trouble, true, what)),
                Action::Wait => {}
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            let left = self.bound(r).map(|b| b.saturating_sub(since.elapsed()));
            if left == Some(Duration::ZERO) {
                return Err(self.give_up(r, trouble, r == Role::Recovery, what));
            }
            if waiting.is_none() {
                say!(r, file = what, role = %r, error = %trouble.message,
                    wait = %self.bound(r).map_or("for ever".into(), |d| format!("{d:?}")),
                    "the archive cannot answer; waiting for it (never reported as absent)");
                waiting = Some(Waiting::new(r));
            } else if let Some(w) = waiting.as_mut() {
                if w.reminded.elapsed() >= REMIND {
                    w.reminded = Instant::now();
                    say!(r, file = what, role = %r, error = %trouble.message,
                        waited = ?started.elapsed(), "still waiting for the archive");
                }
            }
            last = Some(trouble);
            // Back off (never past the deadline: the last attempt comes at it), watching the
            // caller.
            let pause = left.map_or(backoff, |l| l.min(backoff));
            backoff = (backoff * 2).min(Duration::from_secs(10));
            let until = Instant::now() + pause;
            while Instant::now() < until {
                tokio::time::sleep_until(until.min(Instant::now() + TICK)).await;
                if let Some(stop) = self.interrupted(procs, pid, r, what) {
                    return Err(stop);
                }
            }
        }
    }

    /// The caller was killed while it waited: it will never read the answer.
    fn interrupted(
        &self,
        procs: &dyn Processes,
        pid: u32,
        role: Role,
        what: &str,
    ) -> Option<Refusal> {
        if pid == 0 || !procs.dying(pid) {
            return None;
        }
        outcome(role, "interrupted");
        Some(Refusal {
            class: Class::Unavailable,
            role,
            message: format!("{what}: the caller was killed while it waited"),
            concerns: None,
            fatal: false,
            interrupted: true,
        })
    }

    fn give_up(&self, role: Role, t: Trouble, fatal: bool, what: &str) -> Refusal {
        if fatal {
            outcome(role, "stopped");
            tracing::error!(file = what, role = %role, error = %t.message,
                "stopping the recovery with FATAL rather than let PostgreSQL take this file for \
                 absent and promote; fix the archive, then start the server again");
        } else {
            outcome(role, "failed");
            match role {
                Role::Unknown => tracing::error!(file = what, error = %t.message,
                    "failing a read for a process walfs cannot see; if PostgreSQL is recovering \
                     through this mount it will take the file for absent: run the mount where \
                     it can see PostgreSQL's processes (as root or the postgres user, same PID \
                     namespace)"),
                _ => say!(role, file = what, role = %role, error = %t.message, "read failed"),
            }
        }
        Refusal {
            class: t.class,
            role,
            message: t.message,
            concerns: t.concerns,
            fatal,
            interrupted: false,
        }
    }
}

fn outcome(role: Role, what: &'static str) {
    let role: &'static str = match role {
        Role::Recovery => "recovery",
        Role::Standby => "standby",
        Role::Other => "other",
        Role::Unknown => "unknown",
    };
    metrics::counter!("walfs_restore_refusals_total", "role" => role, "outcome" => what)
        .increment(1);
}

/// A read waiting for the store: counted in `walfs_restores_waiting` while it lasts.
struct Waiting {
    role: Role,
    reminded: Instant,
}

impl Waiting {
    fn new(role: Role) -> Waiting {
        metrics::gauge!("walfs_restores_waiting").increment(1.0);
        Waiting {
            role,
            reminded: Instant::now(),
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!("walfs_restores_waiting").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caller::FakeProcs;
    use std::sync::atomic::AtomicU32;

    fn policy() -> Policy {
        Policy {
            recovery_timeout: Some(Duration::from_secs(3)),
            standby_timeout: Duration::from_secs(1),
            other_timeout: Duration::from_secs(2),
            empty_if_new: true,
        }
    }

    fn trouble(class: Class) -> Trouble {
        Trouble {
            class,
            no_archive: false,
            message: "x".into(),
            concerns: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_waited_out_then_the_data_comes() {
        let p = FakeProcs::new(Role::Recovery);
        let calls = AtomicU32::new(0);
        let t0 = tokio::time::Instant::now();
        let r = policy()
            .read(&p, 7, "f", &AtomicU64::new(0), || {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                async move {
                    if n < 2 {
                        Err(trouble(Class::Unavailable))
                    } else {
                        Ok(Some(42))
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), Some(42));
        assert!(t0.elapsed() >= Duration::from_millis(500 + 1000));
    }

    #[tokio::test(start_paused = true)]
    async fn each_role_gives_up_its_own_way() {
        for (role, class, fatal, after) in [
            (Role::Recovery, Class::Unavailable, true, 3),
            (Role::Unknown, Class::Unavailable, false, 3),
            (Role::Standby, Class::Unavailable, false, 1),
            (Role::Other, Class::Unavailable, false, 2),
            (Role::Recovery, Class::Damaged, true, 0),
            (Role::Standby, Class::Damaged, false, 0),
            (Role::Recovery, Class::Misconfigured, true, 0),
        ] {
            let p = FakeProcs::new(role);
            let t0 = tokio::time::Instant::now();
            let e = policy()
                .read(&p, 7, "f", &AtomicU64::new(0), || async {
                    Err::<Option<()>, _>(trouble(class))
                })
                .await
                .unwrap_err();
            assert_eq!(
                (e.fatal, e.interrupted, e.role),
                (fatal, false, role),
                "{role:?} {class:?}"
            );
            let waited = t0.elapsed().as_secs();
            assert!(
                waited >= after && waited <= after + 1,
                "{role:?} {class:?}: gave up after {waited} s"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_store_is_bounded_and_a_killed_caller_answered_at_once() {
        let p = FakeProcs::new(Role::Standby);
        let t0 = tokio::time::Instant::now();
        let e = policy()
            .read(&p, 7, "f", &AtomicU64::new(0), || {
                futures::future::pending::<Result<Option<()>, Trouble>>()
            })
            .await
            .unwrap_err();
        assert!(!e.fatal);
        assert!(t0.elapsed() < Duration::from_secs(2));
        // A recovery waits for ever (no bound), until its caller is killed.
        let p = std::sync::Arc::new(FakeProcs::new(Role::Recovery));
        let forever = Policy {
            recovery_timeout: None,
            ..policy()
        };
        let q = p.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            q.dying.store(true, Ordering::Relaxed);
        });
        let t0 = tokio::time::Instant::now();
        let e = forever
            .read(&*p, 7, "f", &AtomicU64::new(0), || async {
                Err::<Option<()>, _>(trouble(Class::Unavailable))
            })
            .await
            .unwrap_err();
        assert!(e.interrupted && !e.fatal);
        assert!(t0.elapsed() >= Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_archive_is_empty_only_for_others_on_a_read_write_mount() {
        let no_archive = || async {
            Err::<Option<()>, _>(Trouble {
                class: Class::Misconfigured,
                no_archive: true,
                message: "no archive".into(),
                concerns: None,
            })
        };
        let other = FakeProcs::new(Role::Other);
        assert_eq!(
            policy()
                .read(&other, 7, "f", &AtomicU64::new(0), no_archive)
                .await
                .unwrap(),
            None
        );
        let ro = Policy {
            empty_if_new: false,
            ..policy()
        };
        assert!(ro
            .read(&other, 7, "f", &AtomicU64::new(0), no_archive)
            .await
            .is_err());
        let rec = FakeProcs::new(Role::Recovery);
        assert!(
            policy()
                .read(&rec, 7, "f", &AtomicU64::new(0), no_archive)
                .await
                .unwrap_err()
                .fatal
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_download_that_moves_is_never_cut() {
        let p = FakeProcs::new(Role::Standby);
        let progress = std::sync::Arc::new(AtomicU64::new(0));
        let t0 = tokio::time::Instant::now();
        let r = policy()
            .read(&p, 7, "f", &progress, || {
                let progress = progress.clone();
                async move {
                    for _ in 0..20 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        progress.fetch_add(1000, Ordering::Relaxed);
                    }
                    Ok::<_, Trouble>(Some(1))
                }
            })
            .await;
        assert_eq!(r.unwrap(), Some(1));
        assert!(
            t0.elapsed() >= Duration::from_secs(4),
            "longer than the standby's bound"
        );
    }
}
