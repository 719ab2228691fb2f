//! What the server knows of every edit it was given: its status, the queue of work in log order,
//! and the rules for accepting new work (idempotent ids, conflicts, capacity). Pure bookkeeping:
//! the handlers make the log durable first, then record here; the trainer takes work from here.

use std::collections::{HashMap, HashSet, VecDeque};

use anyhow::{Context, Result};
use serde::Serialize;

use super::editlog::Entry;
use crate::data::EditRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Training,
    Committed,
    Failed,
    /// A rollback is logged and waits for the trainer.
    Deleting,
    Deleted,
}

/// One edit as `GET /v1/edits/{id}` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct EditInfo {
    /// Its `add` line in the log (`None`: applied to the state before the server's log).
    pub seq: Option<u64>,
    /// The record as accepted (`None` for an edit applied before the log).
    pub record: Option<EditRecord>,
    pub status: Status,
    /// The generation that made it visible (or, once deleted, that removed it).
    pub generation: Option<u64>,
    pub error: Option<String>,
}

/// A unit of the trainer's work, in log order.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Consecutive queued edits, at most one batch.
    Add(Vec<EditRecord>),
    Delete(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add(String),
    Delete(String),
}

/// Why new work is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Conflict(String),
    NotFound(String),
    QueueFull { queued: usize, limit: usize },
}

/// What accepting a record means.
#[derive(Debug, Clone, PartialEq)]
pub enum Acceptance {
    /// Already logged with the same payload: the same answer, nothing new.
    Existing(u64),
    New,
}

#[derive(Debug, Default)]
pub struct Ledger {
    edits: HashMap<String, EditInfo>,
    queue: VecDeque<Op>,
}

impl Ledger {
    /// The ledger after a restart: the state's applied ids (`generation` is the state's) and the
    /// log's entries, in order. Logged edits that are not applied (and were not rolled back or
    /// failed) are queued again, as are logged rollbacks of edits still applied.
    pub fn replay(entries: &[Entry], applied: &[String]) -> Result<Ledger> {
        let applied: HashSet<&str> = applied.iter().map(String::as_str).collect();
        let mut ledger = Ledger::default();
        for id in &applied {
            ledger
                .edits
                .insert(id.to_string(), info(None, None, Status::Committed));
        }
        for entry in entries {
            match entry {
                Entry::Add { seq, id, record } => {
                    let record: EditRecord = serde_json::from_value(record.clone())
                        .with_context(|| format!("edit log: the record of {id:?}"))?;
                    if applied.contains(id.as_str()) {
                        let e = ledger.edits.get_mut(id).expect("inserted above");
                        e.seq = Some(*seq);
                        e.record = Some(record);
                    } else {
                        ledger.accept_add(*seq, record);
                    }
                }
                Entry::Delete { seq: _, id } => {
                    if applied.contains(id.as_str()) {
                        ledger.accept_delete(id);
                    } else if let Some(e) = ledger.edits.get_mut(id) {
                        // Rolled back before the crash, or never trained.
                        e.status = Status::Deleted;
                        ledger.queue.retain(|op| op != &Op::Add(id.clone()));
                    }
                }
                Entry::Committed { ids, generation } => {
                    for id in ids {
                        if let Some(e) = ledger.edits.get_mut(id) {
                            e.generation = Some(*generation);
                        }
                    }
                }
                Entry::Deleted { id, generation } => {
                    if let Some(e) = ledger.edits.get_mut(id) {
                        e.generation = Some(*generation);
                    }
                }
                Entry::Leader { .. } => {}
                Entry::Failed { ids, error } => {
                    for id in ids {
                        if let Some(e) = ledger.edits.get_mut(id) {
                            if e.status == Status::Queued {
                                e.status = Status::Failed;
                                e.error = Some(error.clone());
                                ledger.queue.retain(|op| op != &Op::Add(id.clone()));
                            }
                        }
                    }
                }
            }
        }
        Ok(ledger)
    }

    pub fn get(&self, id: &str) -> Option<&EditInfo> {
        self.edits.get(id)
    }

    /// Edits waiting for the trainer (not counting the batch in training).
    pub fn queued_edits(&self) -> usize {
        self.queue
            .iter()
            .filter(|op| matches!(op, Op::Add(_)))
            .count()
    }

    /// Whether there is work for the trainer.
    pub fn has_work(&self) -> bool {
        !self.queue.is_empty()
    }

    /// How each of `records` would be accepted, or why the request is refused as a whole (so a
    /// refused request logs nothing). At most `limit` edits may wait in the queue.
    pub fn check_add(
        &self,
        records: &[EditRecord],
        limit: usize,
    ) -> Result<Vec<Acceptance>, Refusal> {
        let mut in_request: HashMap<&str, &EditRecord> = HashMap::new();
        let mut out = Vec::with_capacity(records.len());
        let mut new = 0;
        for r in records {
            if let Some(earlier) = in_request.insert(&r.id, r) {
                if earlier != r {
                    return Err(Refusal::Conflict(format!(
                        "edit {:?} is given twice in this request with different contents",
                        r.id
                    )));
                }
            }
            out.push(match self.edits.get(&r.id) {
                None => {
                    new += 1;
                    Acceptance::New
                }
                Some(e) if matches!(e.status, Status::Deleted | Status::Deleting) => {
                    return Err(Refusal::Conflict(format!(
                        "edit {:?} was rolled back; an id is not reused (send the edit under a new id)",
                        r.id
                    )))
                }
                Some(EditInfo { record: None, .. }) => {
                    return Err(Refusal::Conflict(format!(
                        "edit {:?} is already in the state (applied before this server's log); \
                         an id is not reused",
                        r.id
                    )))
                }
                Some(EditInfo { record: Some(old), seq, .. }) if old == r => {
                    Acceptance::Existing(seq.expect("logged edits have a sequence number"))
                }
                Some(_) => {
                    return Err(Refusal::Conflict(format!(
                        "edit {:?} was already accepted with different contents",
                        r.id
                    )))
                }
            });
        }
        // A repeated id in the request counts once.
        let distinct_new = out
            .iter()
            .zip(records)
            .filter(|(a, _)| **a == Acceptance::New)
            .map(|(_, r)| r.id.as_str())
            .collect::<HashSet<_>>()
            .len();
        debug_assert!(distinct_new <= new);
        let queued = self.queued_edits();
        if queued + distinct_new > limit {
            return Err(Refusal::QueueFull { queued, limit });
        }
        Ok(out)
    }

    /// Records a logged edit as queued.
    pub fn accept_add(&mut self, seq: u64, record: EditRecord) {
        let id = record.id.clone();
        self.edits
            .insert(id.clone(), info(Some(seq), Some(record), Status::Queued));
        self.queue.push_back(Op::Add(id));
    }

    /// Whether a rollback of `id` has anything to do: `Ok(true)` when it must be logged,
    /// `Ok(false)` when the edit is already rolled back (or being rolled back).
    pub fn check_delete(&self, id: &str) -> Result<bool, Refusal> {
        match self.edits.get(id) {
            None => Err(Refusal::NotFound(format!("no edit {id:?}"))),
            Some(e) => Ok(!matches!(e.status, Status::Deleted | Status::Deleting)),
        }
    }

    /// Records a logged rollback: an edit still queued is dropped from the queue at once (it
    /// never trains); an applied one (or one in training) waits for the trainer.
    pub fn accept_delete(&mut self, id: &str) {
        let Some(e) = self.edits.get_mut(id) else {
            return;
        };
        match e.status {
            Status::Queued | Status::Failed => {
                e.status = Status::Deleted;
                self.queue.retain(|op| op != &Op::Add(id.to_string()));
            }
            Status::Training | Status::Committed => {
                e.status = Status::Deleting;
                self.queue.push_back(Op::Delete(id.to_string()));
            }
            Status::Deleting | Status::Deleted => {}
        }
    }

    /// The next unit of work in log order (up to `batch` consecutive edits, or one rollback),
    /// marked as in progress.
    pub fn take_work(&mut self, batch: usize) -> Option<Work> {
        match self.queue.pop_front()? {
            Op::Delete(id) => Some(Work::Delete(id)),
            Op::Add(first) => {
                let mut ids = vec![first];
                while ids.len() < batch.max(1) {
                    match self.queue.front() {
                        Some(Op::Add(_)) => {
                            let Some(Op::Add(id)) = self.queue.pop_front() else {
                                unreachable!()
                            };
                            ids.push(id);
                        }
                        _ => break,
                    }
                }
                let mut records = Vec::with_capacity(ids.len());
                for id in ids {
                    let e = self.edits.get_mut(&id).expect("queued edits are known");
                    e.status = Status::Training;
                    records.push(e.record.clone().expect("queued edits have records"));
                }
                Some(Work::Add(records))
            }
        }
    }

    /// The outcome of training `ids`: committed in `generation`, or failed with an error.
    pub fn finish_adds(&mut self, ids: &[String], outcome: Result<u64, String>) {
        for id in ids {
            if let Some(e) = self.edits.get_mut(id) {
                // A rollback logged while it trained keeps its `deleting` status.
                match (&outcome, e.status) {
                    (Ok(g), Status::Training) => {
                        e.status = Status::Committed;
                        e.generation = Some(*g);
                    }
                    (Ok(g), _) => e.generation = Some(*g),
                    (Err(err), _) => {
                        e.status = Status::Failed;
                        e.error = Some(err.clone());
                        self.queue.retain(|op| op != &Op::Delete(id.clone()));
                    }
                }
            }
        }
    }

    /// The outcome of rolling `id` back.
    pub fn finish_delete(&mut self, id: &str, outcome: Result<u64, String>) {
        if let Some(e) = self.edits.get_mut(id) {
            match outcome {
                Ok(g) => {
                    e.status = Status::Deleted;
                    e.generation = Some(g);
                    e.error = None;
                }
                Err(err) => {
                    e.status = Status::Committed;
                    e.error = Some(format!("rollback failed: {err}"));
                }
            }
        }
    }
}

fn info(seq: Option<u64>, record: Option<EditRecord>, status: Status) -> EditInfo {
    EditInfo {
        seq,
        record,
        status,
        generation: None,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, target: &str) -> EditRecord {
        EditRecord {
            id: id.into(),
            knowledge_id: id.into(),
            prompt: format!("prompt of {id}"),
            target_new: target.into(),
            target_true: None,
            subject: None,
            rephrases: vec![],
            locality: vec![],
        }
    }

    fn add(seq: u64, r: &EditRecord) -> Entry {
        Entry::Add {
            seq,
            id: r.id.clone(),
            record: serde_json::to_value(r).unwrap(),
        }
    }

    #[test]
    fn ids_are_idempotent_conflicts_are_refused_and_capacity_is_bounded() {
        let mut l = Ledger::default();
        let a = rec("a", "x");
        assert_eq!(
            l.check_add(std::slice::from_ref(&a), 2),
            Ok(vec![Acceptance::New])
        );
        l.accept_add(1, a.clone());
        assert_eq!(
            l.check_add(std::slice::from_ref(&a), 2),
            Ok(vec![Acceptance::Existing(1)])
        );
        assert!(matches!(
            l.check_add(&[rec("a", "y")], 2),
            Err(Refusal::Conflict(_))
        ));
        assert!(matches!(
            l.check_add(&[rec("b", "x"), rec("b", "z")], 2),
            Err(Refusal::Conflict(_))
        ));
        // One queued plus two new is over a limit of 2; a repeated id counts once.
        assert!(matches!(
            l.check_add(&[rec("b", "x"), rec("c", "x")], 2),
            Err(Refusal::QueueFull {
                queued: 1,
                limit: 2
            })
        ));
        assert_eq!(
            l.check_add(&[rec("b", "x"), rec("b", "x")], 2),
            Ok(vec![Acceptance::New, Acceptance::New])
        );
    }

    #[test]
    fn work_comes_in_log_order_in_batches_and_rollbacks_wait_their_turn() {
        let mut l = Ledger::default();
        for (seq, id) in [(1, "a"), (2, "b"), (3, "c")] {
            l.accept_add(seq, rec(id, "x"));
        }
        assert_eq!(
            l.take_work(2),
            Some(Work::Add(vec![rec("a", "x"), rec("b", "x")]))
        );
        assert_eq!(l.get("a").unwrap().status, Status::Training);
        l.accept_delete("a"); // while it trains: waits
        l.accept_delete("c"); // still queued: dropped at once
        assert_eq!(l.get("c").unwrap().status, Status::Deleted);
        l.finish_adds(&["a".into(), "b".into()], Ok(1));
        assert_eq!(l.get("a").unwrap().status, Status::Deleting);
        assert_eq!(l.get("b").unwrap().status, Status::Committed);
        assert_eq!(l.take_work(2), Some(Work::Delete("a".into())));
        l.finish_delete("a", Ok(2));
        assert_eq!(l.get("a").unwrap().status, Status::Deleted);
        assert_eq!(l.get("a").unwrap().generation, Some(2));
        assert_eq!(l.take_work(2), None);
        assert!(matches!(
            l.check_add(&[rec("a", "x")], 9),
            Err(Refusal::Conflict(_))
        ));
        assert!(matches!(l.check_delete("zz"), Err(Refusal::NotFound(_))));
        assert_eq!(l.check_delete("a"), Ok(false));
    }

    #[test]
    fn replay_requeues_exactly_what_the_state_lacks() {
        let (a, b, c, d) = (rec("a", "x"), rec("b", "x"), rec("c", "x"), rec("d", "x"));
        let entries = vec![
            add(1, &a),
            add(2, &b),
            Entry::Committed {
                ids: vec!["a".into()],
                generation: 4,
            },
            add(3, &c),
            Entry::Delete {
                seq: 4,
                id: "a".into(),
            },
            add(5, &d),
            Entry::Failed {
                ids: vec!["d".into()],
                error: "boom".into(),
            },
            Entry::Delete {
                seq: 6,
                id: "c".into(),
            },
        ];
        // The state has "old" (from `elder edit`) and "a"; "b" was acknowledged but not applied.
        let l = Ledger::replay(&entries, &["old".into(), "a".into()]).unwrap();
        let mut l2 = Ledger::replay(&entries, &["old".into(), "a".into()]).unwrap();
        assert_eq!(l.get("old").unwrap().status, Status::Committed);
        assert_eq!(l.get("a").unwrap().generation, Some(4));
        assert_eq!(l.get("a").unwrap().status, Status::Deleting);
        assert_eq!(l.get("b").unwrap().status, Status::Queued);
        assert_eq!(l.get("c").unwrap().status, Status::Deleted);
        assert_eq!(l.get("d").unwrap().status, Status::Failed);
        assert_eq!(l2.take_work(8), Some(Work::Add(vec![b.clone()])));
        assert_eq!(l2.take_work(8), Some(Work::Delete("a".into())));
        assert_eq!(l2.take_work(8), None);
        // Once the rollback is applied (a no longer in the state) nothing is left to do.
        let mut l3 = Ledger::replay(&entries, &["old".into(), "b".into()]).unwrap();
        assert_eq!(l3.get("a").unwrap().status, Status::Deleted);
        assert_eq!(l3.take_work(8), None);
    }
}
