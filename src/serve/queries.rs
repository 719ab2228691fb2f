//! The query worker: one thread that owns the query engine and answers completion and scoring
//! requests in batches. Whatever has queued while the last batch ran goes into the next one (one
//! padded prefill and shared decode steps for the completions, one scoring forward for the
//! scores), all against one served generation.

use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::{mpsc::UnboundedSender, oneshot};

use super::Served;
use crate::engine::Engine;
use crate::model::runner::Sampling;

/// Requests answered in one batch at most (more wait for the next).
pub const MAX_BATCH: usize = 16;

/// A completion's tokens and scope, and the generation that produced them.
#[derive(Debug, Clone)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub in_scope: bool,
    pub generation: u64,
}

/// A score's log-probabilities, argmax and scope, and the generation that produced them.
#[derive(Debug, Clone)]
pub struct ScoreResult {
    pub logprobs: Vec<f32>,
    pub argmax: Vec<u32>,
    pub in_scope: bool,
    pub generation: u64,
}

pub enum Job {
    Complete {
        prompt: Vec<u32>,
        sampling: Sampling,
        /// Hears every token as it is decoded (streamed responses).
        tokens: Option<UnboundedSender<u32>>,
        reply: oneshot::Sender<Result<Completion, String>>,
    },
    Score {
        prompt: Vec<u32>,
        target: Vec<u32>,
        reply: oneshot::Sender<Result<ScoreResult, String>>,
    },
}

/// Answers jobs until every sender is gone.
pub fn run(mut engine: Engine, served: impl Fn() -> Arc<Served>, jobs: Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let snapshot = served();
        let (mut completions, mut scores) = (Vec::new(), Vec::new());
        for job in batch {
            match job {
                Job::Complete { .. } => completions.push(job),
                Job::Score { .. } => scores.push(job),
            }
        }
        if !completions.is_empty() {
            complete(&mut engine, &snapshot, completions);
        }
        if !scores.is_empty() {
            score(&mut engine, &snapshot, scores);
        }
    }
}

fn complete(engine: &mut Engine, served: &Served, jobs: Vec<Job>) {
    let mut prompts = Vec::new();
    let mut sampling = Vec::new();
    let mut listeners = Vec::new();
    let mut replies = Vec::new();
    for job in jobs {
        if let Job::Complete {
            prompt,
            sampling: s,
            tokens,
            reply,
        } = job
        {
            prompts.push(prompt);
            sampling.push(s);
            listeners.push(tokens);
            replies.push(reply);
        }
    }
    let listener = listeners.iter().any(Option::is_some).then(|| {
        Box::new(move |row: usize, token: u32| {
            if let Some(Some(tx)) = listeners.get(row) {
                let _ = tx.send(token); // a client that left is not an error
            }
        }) as crate::model::runner::TokenListener
    });
    let result = engine.generate_batch(served.elder.as_deref(), &prompts, &sampling, listener);
    match result {
        Ok((tokens, scope)) => {
            for ((reply, tokens), in_scope) in replies.into_iter().zip(tokens).zip(scope) {
                let _ = reply.send(Ok(Completion {
                    tokens,
                    in_scope: in_scope.unwrap_or(false),
                    generation: served.generation,
                }));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(format!("{e:#}")));
            }
        }
    }
}

fn score(engine: &mut Engine, served: &Served, jobs: Vec<Job>) {
    let mut pairs = Vec::new();
    let mut replies = Vec::new();
    for job in jobs {
        if let Job::Score {
            prompt,
            target,
            reply,
        } = job
        {
            pairs.push((prompt, target));
            replies.push(reply);
        }
    }
    let refs: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|(p, t)| (p.as_slice(), t.as_slice()))
        .collect();
    match engine.score_batch(served.elder.as_deref(), &refs) {
        Ok(scored) => {
            for (reply, s) in replies.into_iter().zip(scored) {
                let _ = reply.send(Ok(ScoreResult {
                    logprobs: s.logprobs,
                    argmax: s.argmax,
                    in_scope: s.in_scope,
                    generation: served.generation,
                }));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(format!("{e:#}")));
            }
        }
    }
}
