//! The trainer: one thread, the state's only writer. It takes work from the ledger in log order
//! (a batch of queued edits, or one rollback), applies it through the engine, commits a new
//! generation, then publishes it to the readers. A failed batch leaves the state on disk as it
//! was; the session is reopened from disk so memory and disk agree again.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::editlog::Entry;
use super::ledger::Work;
use super::Shared;
use crate::engine::Engine;
use crate::session::EditSession;

/// Trains until the server stops (after finishing the unit of work in hand).
pub fn run(shared: Arc<Shared>, mut engine: Engine, mut session: EditSession) {
    let batch = session.elder.cfg.batch_size.max(1);
    while let Some(work) = shared.next_work(batch) {
        let start = Instant::now();
        let outcome = match &work {
            Work::Add(records) => engine
                .apply_stream(&mut session, records, false, None)
                .map(|_| ()),
            Work::Delete(id) => session.forget(id),
        };
        let outcome = outcome.map(|()| session.state.generation());
        if let Err(e) = &outcome {
            eprintln!("error: {}: {e:#}", describe(&work));
            if let Err(reopen) = reopen(&engine, &mut session) {
                // Without a consistent session nothing more can be trained safely.
                eprintln!(
                    "error: reopening the state after the failure: {reopen:#}; the trainer stops"
                );
                shared.finish(&work, outcome.map_err(|e| format!("{e:#}")), None);
                shared.trainer_stopped();
                return;
            }
        }
        if outcome.is_ok() && !publish_until_done(&shared, &work, &session) {
            // Fenced by another leader: what was committed here stays local.
            shared.finish(&work, outcome.map_err(|e| format!("{e:#}")), None);
            break;
        }
        let seconds = start.elapsed().as_secs_f64();
        let snapshot = outcome.is_ok().then(|| super::Served::of(&session));
        shared.finish(&work, outcome.map_err(|e| format!("{e:#}")), snapshot);
        metrics::histogram!("elder_edit_training_seconds").record(seconds);
    }
    shared.trainer_stopped();
}

/// On JetStream, publishes the generation just committed, retrying while NATS is unreachable
/// (a cluster node going away); `false` once this server is fenced or stopping.
fn publish_until_done(shared: &Shared, work: &Work, session: &EditSession) -> bool {
    loop {
        match shared.publish_generation(work, session) {
            Ok(()) => return true,
            Err(_) if shared.is_fenced() => return false,
            Err(e) => {
                eprintln!("warning: {e}; retrying");
                if shared.is_stopping() {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
    }
}

fn describe(work: &Work) -> String {
    match work {
        Work::Add(records) => format!(
            "training edits {:?}",
            records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>()
        ),
        Work::Delete(id) => format!("rolling back edit {id:?}"),
    }
}

fn reopen(engine: &Engine, session: &mut EditSession) -> Result<()> {
    let dir = session.state.dir().to_path_buf();
    *session = EditSession::open(&engine.base, &dir, None)?;
    Ok(())
}

/// The log line that records a unit of work's outcome (`None` for a failed rollback: the edit
/// stays applied and its `delete` line stays a promise that the next start retries).
pub fn outcome_entry(work: &Work, outcome: &Result<u64, String>) -> Option<Entry> {
    let ids = |records: &[crate::data::EditRecord]| records.iter().map(|r| r.id.clone()).collect();
    match (work, outcome) {
        (Work::Add(records), Ok(generation)) => Some(Entry::Committed {
            ids: ids(records),
            generation: *generation,
        }),
        (Work::Add(records), Err(e)) => Some(Entry::Failed {
            ids: ids(records),
            error: e.clone(),
        }),
        (Work::Delete(id), Ok(generation)) => Some(Entry::Deleted {
            id: id.clone(),
            generation: *generation,
        }),
        (Work::Delete(_), Err(_)) => None,
    }
}
