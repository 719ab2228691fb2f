//! `elder serve`: an HTTP service that ingests edit streams while it answers queries.
//!
//! One writer, many readers: the trainer thread ([`trainer`]) is the state's only writer and
//! applies edits in the order of the write-ahead edit log ([`editlog`]); every commit is a new
//! generation, published whole to the readers. The query worker ([`queries`]) answers
//! completions and scores in batches, each batch from one published generation. The HTTP layer
//! ([`api`]) checks and bounds every request, makes accepted edits durable before it answers
//! 202, and reports in OpenAI's shapes.

pub mod api;
pub mod chunks;
pub mod editlog;
pub mod http;
pub mod ledger;
pub mod queries;
pub mod replication;
pub mod trainer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::elder::capture::CpuSites;
use crate::elder::config::ElderConfig;
use crate::elder::molora::Elder;
use crate::engine::{Device, DeviceChoice, Engine};
use crate::session::{BaseModel, EditSession};
use editlog::{EditLog, Entry};
use ledger::{Ledger, Work};
use replication::{CommitRecord, LogError, Nats, NatsOptions, Role};

/// What `elder serve` was asked for.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    pub state: PathBuf,
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    pub devices: DeviceChoice,
    /// The method config for a new state (`None`: the model's default preset).
    pub config: Option<ElderConfig>,
    pub limits: Limits,
    /// The edit log on NATS JetStream and this server's role (`None`: the local log).
    pub nats: Option<NatsOptions>,
}

/// The bounds on what a client may ask.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Requests under `/v1` in flight at once; more get 429.
    pub max_concurrent: usize,
    /// Edits waiting for the trainer; more get 429.
    pub max_queued_edits: usize,
    /// `max_tokens` of one completion.
    pub max_tokens: usize,
    /// Prompts in one completion request, edits in one edit request.
    pub max_items: usize,
    /// How long a request may wait for its answer (or for `min_generation`).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            max_concurrent: 64,
            max_queued_edits: 10_000,
            max_tokens: 512,
            max_items: 256,
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// One committed generation as the readers see it (`elder: None` while nothing is applied: the
/// base model answers).
pub struct Served {
    pub generation: u64,
    pub elder: Option<Arc<Elder>>,
}

impl Served {
    fn of(session: &EditSession) -> Arc<Served> {
        let applied = !session.state.applied_ids().is_empty();
        Arc::new(Served {
            generation: session.state.generation(),
            elder: applied.then(|| Arc::new(session.elder.clone())),
        })
    }
}

const LOADING: u8 = 0;
const READY: u8 = 1;
const SHUTTING_DOWN: u8 = 2;

/// Where accepted edits are logged: the local write-ahead log, or the JetStream edit log (a
/// leader's; `last` is the log's last sequence as this leader wrote it).
pub enum Log {
    Local(EditLog),
    Nats {
        nats: Arc<Nats>,
        handle: tokio::runtime::Handle,
        last: u64,
    },
}

impl Log {
    /// The sequence number the next promise gets.
    pub fn next_seq(&self) -> u64 {
        match self {
            Log::Local(log) => log.next_seq(),
            Log::Nats { last, .. } => last + 1,
        }
    }

    /// Makes `entries` durable (a local fsync, or JetStream's acknowledgement). On JetStream the
    /// promises (`add`, `delete`) and failed batches go to the log; the other outcomes travel in
    /// commit records.
    /// Called from blocking threads only.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        match self {
            Log::Local(log) => log.append(entries).map_err(LogError::Other),
            Log::Nats { nats, handle, last } => {
                *last = handle.block_on(nats.append(entries, *last))?;
                Ok(())
            }
        }
    }
}

/// The log and the ledger, changed together under one lock.
struct Book {
    log: Option<Log>,
    ledger: Ledger,
    stopping: bool,
}

/// A server on JetStream: its role, where the leader answers, and what the commits stream holds.
pub struct Replication {
    pub role: Role,
    nats: Arc<Nats>,
    handle: tokio::runtime::Handle,
    /// The commits stream's last sequence as this server knows it.
    commits_last: Mutex<u64>,
    /// The newest generation published (a replica's lag is this minus the served one).
    latest: std::sync::atomic::AtomicU64,
    leader_url: RwLock<String>,
}

impl Replication {
    pub fn leader_url(&self) -> String {
        self.leader_url.read().expect("leader lock").clone()
    }

    pub fn latest_generation(&self) -> u64 {
        self.latest.load(Ordering::SeqCst)
    }
}

/// What the HTTP handlers, the trainer and the query worker share.
pub struct Shared {
    pub limits: Limits,
    pub api_key: Option<String>,
    pub model_name: String,
    phase: AtomicU8,
    served: RwLock<Arc<Served>>,
    generation: tokio::sync::watch::Sender<u64>,
    book: Mutex<Book>,
    work_ready: Condvar,
    jobs: OnceLock<std::sync::mpsc::SyncSender<queries::Job>>,
    base: OnceLock<Arc<BaseModel>>,
    /// Why the state cannot roll edits back (`None`: it can), known once loaded.
    forget_unsupported: OnceLock<Option<String>>,
    trainer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// This server's own address (`http://ADDR`).
    pub url: String,
    /// Set when this server is on JetStream.
    pub replication: OnceLock<Replication>,
    /// Set when another leader took over the edit log: no more edits here.
    fenced: std::sync::atomic::AtomicBool,
    pub metrics: PrometheusHandle,
    pub request_slots: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    fn new(opts: &ServeOptions, metrics: PrometheusHandle, url: String) -> Self {
        let model_name = opts
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_string());
        Shared {
            limits: opts.limits,
            api_key: opts.api_key.clone(),
            model_name,
            phase: AtomicU8::new(LOADING),
            served: RwLock::new(Arc::new(Served {
                generation: 0,
                elder: None,
            })),
            generation: tokio::sync::watch::channel(0).0,
            book: Mutex::new(Book {
                log: None,
                ledger: Ledger::default(),
                stopping: false,
            }),
            work_ready: Condvar::new(),
            jobs: OnceLock::new(),
            base: OnceLock::new(),
            forget_unsupported: OnceLock::new(),
            trainer: Mutex::new(None),
            url,
            replication: OnceLock::new(),
            fenced: std::sync::atomic::AtomicBool::new(false),
            metrics,
            request_slots: Arc::new(tokio::sync::Semaphore::new(opts.limits.max_concurrent)),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == READY
    }

    pub fn phase_name(&self) -> &'static str {
        match self.phase.load(Ordering::SeqCst) {
            LOADING => "loading",
            READY => "ready",
            _ => "shutting_down",
        }
    }

    /// The generation queries are answered from now.
    pub fn served(&self) -> Arc<Served> {
        self.served.read().expect("served lock").clone()
    }

    /// Waits (bounded) until generation `min` or a later one is served.
    pub async fn wait_for_generation(&self, min: u64, limit: Duration) -> bool {
        let mut rx = self.generation.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|g| *g >= min))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The base model (loaded before the server is ready).
    pub fn base(&self) -> Option<&Arc<BaseModel>> {
        self.base.get()
    }

    pub fn forget_unsupported(&self) -> Option<String> {
        self.forget_unsupported.get().cloned().flatten()
    }

    /// Hands a query to the worker (`false` when it is gone or full).
    pub fn submit(&self, job: queries::Job) -> bool {
        self.jobs.get().is_some_and(|tx| tx.try_send(job).is_ok())
    }

    /// Runs `f` on the ledger and the log under their lock (`Err` while shutting down, or before
    /// the log is open), waking the trainer afterwards.
    pub fn with_book<T>(
        &self,
        f: impl FnOnce(&mut Ledger, &mut Log) -> T,
    ) -> Result<T, &'static str> {
        let mut book = self.book.lock().expect("book lock");
        if self.is_fenced() {
            return Err("another leader took over the edit log; this server takes no more edits");
        }
        if book.stopping || !self.is_ready() {
            return Err(if book.stopping {
                "the server is shutting down"
            } else {
                "the server is not ready"
            });
        }
        let Book { log, ledger, .. } = &mut *book;
        let log = log.as_mut().ok_or("the server is not ready")?;
        let out = f(ledger, log);
        metrics::gauge!("elder_edit_queue_depth").set(ledger.queued_edits() as f64);
        drop(book);
        self.work_ready.notify_all();
        Ok(out)
    }

    /// Whether another leader took over the edit log.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// After a refused append or publish: this server stops taking and training edits.
    pub fn fence(&self) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            eprintln!(
                "error: another leader wrote to the edit log; this server takes no more edits"
            );
        }
        self.book.lock().expect("book lock").stopping = true;
        self.work_ready.notify_all();
    }

    /// A replica's role (`None`: this server trains).
    pub fn replica_of(&self) -> Option<String> {
        self.replication
            .get()
            .filter(|r| r.role == Role::Replica)
            .map(Replication::leader_url)
    }

    /// Serves `snapshot` from now on (every later query sees it whole).
    fn publish_served(&self, snapshot: Arc<Served>) {
        let generation = snapshot.generation;
        *self.served.write().expect("served lock") = snapshot;
        self.generation.send_replace(generation);
        metrics::gauge!("elder_state_generation").set(generation as f64);
        if let Some(r) = self.replication.get() {
            let lag = r.latest_generation().saturating_sub(generation);
            metrics::gauge!("elder_replica_lag_generations").set(lag as f64);
        }
    }

    /// A leader on JetStream publishes a committed generation (its files and record); a refused
    /// publish fences this server. Called from the trainer thread.
    fn publish_generation(&self, work: &Work, session: &EditSession) -> Result<(), String> {
        let Some(r) = self.replication.get() else {
            return Ok(());
        };
        let (ids, seqs, deleted) = match work {
            Work::Add(records) => {
                let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
                let seqs = self.with_ledger(|l| {
                    ids.iter()
                        .filter_map(|id| l.get(id).and_then(|e| e.seq))
                        .collect()
                });
                (ids, seqs, None)
            }
            Work::Delete(id) => (Vec::new(), Vec::new(), Some(id.clone())),
        };
        let record = CommitRecord {
            generation: session.state.generation(),
            ids,
            seqs,
            deleted,
            manifest_file: None,
            manifest: String::new(),
            files: Vec::new(),
            leader: self.url.clone(),
        };
        let mut last = r.commits_last.lock().expect("commits lock");
        match r.handle.block_on(
            r.nats
                .publish_generation(session.state.dir(), record, *last),
        ) {
            Ok(seq) => {
                *last = seq;
                r.latest
                    .fetch_max(session.state.generation(), Ordering::SeqCst);
                Ok(())
            }
            Err(LogError::Fenced { .. }) => {
                drop(last);
                self.fence();
                Err("another leader took over the edit log".to_string())
            }
            Err(e) => Err(format!(
                "publishing generation {}: {e}",
                session.state.generation()
            )),
        }
    }

    /// Reads the ledger.
    pub fn with_ledger<T>(&self, f: impl FnOnce(&Ledger) -> T) -> T {
        f(&self.book.lock().expect("book lock").ledger)
    }

    /// The trainer's next unit of work; `None` once the server stops.
    fn next_work(&self, batch: usize) -> Option<Work> {
        let mut book = self.book.lock().expect("book lock");
        loop {
            if book.stopping {
                return None;
            }
            if let Some(work) = book.ledger.take_work(batch) {
                metrics::gauge!("elder_edit_queue_depth").set(book.ledger.queued_edits() as f64);
                return Some(work);
            }
            book = self.work_ready.wait(book).expect("book lock");
        }
    }

    /// Records a unit of work's outcome: the ledger's status, the new generation served, then
    /// the log's outcome line. The first two change under the one book lock, so a client served
    /// the new generation reads its edits as committed and one that reads `committed` is served
    /// that generation (never one without the other).
    fn finish(&self, work: &Work, outcome: Result<u64, String>, snapshot: Option<Arc<Served>>) {
        let mut book = self.book.lock().expect("book lock");
        match work {
            Work::Add(records) => {
                let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
                let counter = if outcome.is_ok() {
                    "elder_edits_committed_total"
                } else {
                    "elder_edits_failed_total"
                };
                metrics::counter!(counter).increment(ids.len() as u64);
                book.ledger.finish_adds(&ids, outcome.clone());
            }
            Work::Delete(id) => {
                if outcome.is_ok() {
                    metrics::counter!("elder_edits_deleted_total").increment(1);
                }
                book.ledger.finish_delete(id, outcome.clone());
            }
        }
        if let Some(s) = snapshot {
            self.publish_served(s);
        }
        if let Some(entry) = trainer::outcome_entry(work, &outcome) {
            if let Some(log) = &mut book.log {
                if let Err(e) = log.append(&[entry]) {
                    // Advisory: the state's manifest already says what is applied.
                    eprintln!("warning: {e:#}");
                }
            }
        }
    }

    fn is_stopping(&self) -> bool {
        self.book.lock().expect("book lock").stopping
    }

    fn trainer_stopped(&self) {
        self.book.lock().expect("book lock").stopping = true;
    }

    /// Stops taking edits and asks the trainer to stop after the work in hand.
    fn begin_shutdown(&self) {
        self.phase.store(SHUTTING_DOWN, Ordering::SeqCst);
        self.book.lock().expect("book lock").stopping = true;
        self.work_ready.notify_all();
    }
}

/// Opens the model, the state and the log, replays the log into the ledger, starts the trainer
/// and the query worker (a replica: the follower instead of the trainer), then marks the server
/// ready.
fn load(shared: &Arc<Shared>, opts: &ServeOptions) -> Result<()> {
    let base = Arc::new(BaseModel::open(&opts.model)?);
    let handle = tokio::runtime::Handle::current();
    let nats = match &opts.nats {
        Some(n) => Some((Arc::new(handle.block_on(Nats::connect(n))?), n.role)),
        None => None,
    };
    // A leader whose state is older than the newest published generation starts from that.
    let mut commits_last = 0;
    let mut records = Vec::new();
    if let Some((nats, _)) = &nats {
        records = handle.block_on(nats.commits_from(1))?;
        commits_last = records.last().map_or(0, |(seq, _)| *seq);
    }
    if let Some((nats, Role::Leader)) = &nats {
        let local = EditSession::open(&base, &opts.state, opts.config.clone())?
            .state
            .generation();
        let newest = records
            .iter()
            .filter(|(_, r)| !r.files.is_empty())
            .max_by_key(|(_, r)| r.generation);
        if let Some((_, record)) = newest.filter(|(_, r)| r.generation > local) {
            let done = handle.block_on(nats.install(record, &opts.state))?;
            eprintln!(
                "installed the published generation {} (this state was at {local}; fetched {} of {} bytes)",
                done.generation, done.fetched, done.bytes
            );
        }
    }
    let session = EditSession::open(&base, &opts.state, opts.config.clone())?;
    // Queries go to the GPU when it has what answering with this state needs; edits train there
    // only when the GPU trainer has the state's method too, else on the CPU beside it.
    let cfg = &session.elder.cfg;
    let query_device = opts.devices.resolve_queries(Some(cfg))?;
    let trains = !matches!(&opts.nats, Some(n) if n.role == Role::Replica);
    let device = match &query_device {
        Device::Cuda(..) if !cfg.gpu_training_unsupported().is_empty() => {
            if trains {
                eprintln!(
                "note: queries run on the GPU, edits train on the CPU: the {} preset's {} not in the GPU trainer yet",
                cfg.preset.as_str(),
                cfg.gpu_training_unsupported().join(", ")
                );
            }
            Device::Cpu
        }
        d => d.clone(),
    };
    if matches!(device, Device::Cpu) || matches!(query_device, Device::Cpu) {
        base.model()?; // built now, not by the first query
    }
    let (log, entries) = match &nats {
        Some((nats, role)) => {
            let (mut entries, mut last) = handle.block_on(nats.edit_log())?;
            if *role == Role::Leader {
                // Take the log over; an append that lands in between means reading it again.
                let mut tries = 0;
                loop {
                    match handle.block_on(nats.take_over(&shared.url, last)) {
                        Ok(seq) => {
                            last = seq;
                            break;
                        }
                        Err(LogError::Fenced { .. }) if tries < 20 => {
                            tries += 1;
                            (entries, last) = handle.block_on(nats.edit_log())?;
                        }
                        Err(e) => return Err(anyhow::anyhow!("taking the edit log over: {e}")),
                    }
                }
            }
            // The outcomes travel in the commit records.
            for (_, r) in &records {
                if !r.ids.is_empty() {
                    entries.push(Entry::Committed {
                        ids: r.ids.clone(),
                        generation: r.generation,
                    });
                }
                if let Some(id) = &r.deleted {
                    entries.push(Entry::Deleted {
                        id: id.clone(),
                        generation: r.generation,
                    });
                }
            }
            let log = Log::Nats {
                nats: nats.clone(),
                handle: handle.clone(),
                last,
            };
            (log, entries)
        }
        None => {
            let (log, entries) = EditLog::open(&opts.state)?;
            (Log::Local(log), entries)
        }
    };
    let ledger = Ledger::replay(&entries, session.state.applied_ids())
        .with_context(|| format!("replaying the edit log of {}", opts.state.display()))?;
    let pending = ledger.queued_edits();
    if let Some((nats, role)) = &nats {
        let latest = records.iter().map(|(_, r)| r.generation).max().unwrap_or(0);
        let leader = records
            .last()
            .map(|(_, r)| r.leader.clone())
            .unwrap_or_default();
        let _ = shared.replication.set(Replication {
            role: *role,
            nats: nats.clone(),
            handle: handle.clone(),
            commits_last: Mutex::new(commits_last),
            latest: std::sync::atomic::AtomicU64::new(latest),
            leader_url: RwLock::new(if *role == Role::Leader {
                shared.url.clone()
            } else {
                leader
            }),
        });
    }
    shared.publish_served(Served::of(&session));
    metrics::gauge!("elder_edit_queue_depth").set(pending as f64);
    let _ = shared
        .forget_unsupported
        .set(session.elder.forget_unsupported());
    let _ = shared.base.set(base.clone());

    let (tx, rx) = std::sync::mpsc::sync_channel(4 * opts.limits.max_concurrent.max(1));
    let _ = shared.jobs.set(tx);
    // Each thread makes its own engine (a GPU runtime stays on the thread that uses it); the
    // CPU model is shared.
    let reader = shared.clone();
    let query_base = base.clone();
    std::thread::Builder::new()
        .name("elder-queries".into())
        .spawn(move || {
            let engine = Engine::shared(query_base, query_device);
            queries::run(engine, || reader.served(), rx)
        })?;

    if let Some((nats, Role::Replica)) = &nats {
        // A replica: no log of its own, no trainer; it follows the published generations. What
        // the key store derives from the background text is made now, once, so installing a
        // generation only reads files (each install takes it from the state before).
        let mut session = session;
        if session.elder.key_store_needs_background() {
            session
                .elder
                .ensure_key_store(&mut CpuSites(base.model()?), &base.background_prompts()?)?;
        }
        let follower = shared.clone();
        let (nats, dir) = (nats.clone(), opts.state.clone());
        // From the first record: those at or below this state's generation are skipped, the
        // rest installed in order (a restarted replica catches up on what it missed).
        handle.spawn(follow(follower, nats, base, dir, session, 1));
        eprintln!(
            "replica: generation {}, following the leader",
            shared.served().generation
        );
        shared.phase.store(READY, Ordering::SeqCst);
        return Ok(());
    }
    if let Some((_, Role::Leader)) = &nats {
        // Announce: the previous leader's next append or publish now fails its sequence check.
        let r = shared.replication.get().expect("set above");
        let generation = session.state.generation();
        let record = CommitRecord {
            generation,
            ids: Vec::new(),
            seqs: Vec::new(),
            deleted: None,
            manifest_file: None,
            manifest: String::new(),
            files: Vec::new(),
            leader: shared.url.clone(),
        };
        let published = if generation > r.latest_generation() {
            // Committed here but never published (a leader that died in between): ship it.
            handle.block_on(r.nats.publish_generation(&opts.state, record, commits_last))
        } else {
            handle.block_on(r.nats.publish_record(&record, commits_last))
        };
        *r.commits_last.lock().expect("commits lock") =
            published.map_err(|e| anyhow::anyhow!("announcing this leader: {e}"))?;
        r.latest.fetch_max(generation, Ordering::SeqCst);
        // The retention window goes on from the generations published before this leader.
        let published: Vec<CommitRecord> = records.into_iter().map(|(_, r)| r).collect();
        handle.block_on(r.nats.adopt_published(&published));
    }
    {
        let mut book = shared.book.lock().expect("book lock");
        book.log = Some(log);
        book.ledger = ledger;
    }
    let writer = shared.clone();
    let trains_on = match &device {
        Device::Cpu => "the CPU".to_string(),
        Device::Cuda(_, dtype) => format!("the GPU ({})", dtype.as_str()),
    };
    let handle = std::thread::Builder::new()
        .name("elder-trainer".into())
        .spawn(move || trainer::run(writer, Engine::shared(base, device), session))?;
    *shared.trainer.lock().expect("trainer lock") = Some(handle);
    eprintln!(
        "ready: generation {}, {pending} logged edits to train on {trains_on}",
        shared.served().generation
    );
    shared.phase.store(READY, Ordering::SeqCst);
    shared.work_ready.notify_all();
    Ok(())
}

/// A replica's follower: reads the commit records in order from `next`, and installs and serves
/// every published generation newer than the one it serves, each exactly once.
async fn follow(
    shared: Arc<Shared>,
    nats: Arc<Nats>,
    base: Arc<BaseModel>,
    dir: PathBuf,
    mut session: EditSession,
    mut next: u64,
) {
    let replication = shared
        .replication
        .get()
        .expect("a replica has its replication");
    loop {
        match nats.commits_from(next).await {
            Ok(records) => {
                // Known before installing any: whether a generation that is gone has a successor.
                for (_, record) in &records {
                    replication
                        .latest
                        .fetch_max(record.generation, Ordering::SeqCst);
                }
                for (seq, record) in records {
                    next = seq + 1;
                    *replication.leader_url.write().expect("leader lock") = record.leader.clone();
                    if record.files.is_empty() || record.generation <= session.state.generation() {
                        continue;
                    }
                    let started = std::time::Instant::now();
                    match install(&nats, &record, &base, &dir, &session).await {
                        Ok((installed, done, opened)) => {
                            session = installed;
                            eprintln!(
                                "installed generation {} (fetched {} of {} bytes; {:.2} s to fetch and write, {:.2} s to open)",
                                record.generation,
                                done.fetched,
                                done.bytes,
                                (started.elapsed() - opened).as_secs_f64(),
                                opened.as_secs_f64()
                            );
                            shared.publish_served(Served::of(&session));
                        }
                        Err(e)
                            if replication::is_gone(&e)
                                && replication.latest_generation() > record.generation =>
                        {
                            // Left the object store's retention window while this replica was
                            // behind: a newer generation follows.
                            eprintln!(
                                "note: generation {} is no longer kept ({e:#}); going on with a newer one",
                                record.generation
                            );
                        }
                        Err(e) => {
                            // Retried from this record on the next round.
                            eprintln!("error: installing generation {}: {e:#}", record.generation);
                            next = seq;
                            break;
                        }
                    }
                }
            }
            Err(e) => eprintln!("warning: reading the commit records: {e:#}"),
        }
        let served = shared.served().generation;
        let lag = replication.latest_generation().saturating_sub(served);
        metrics::gauge!("elder_replica_lag_generations").set(lag as f64);
        if !shared.is_ready() && shared.phase_name() == "shutting_down" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn install(
    nats: &Nats,
    record: &CommitRecord,
    base: &Arc<BaseModel>,
    dir: &std::path::Path,
    previous: &EditSession,
) -> Result<(EditSession, replication::Installed, Duration)> {
    let done = nats.install(record, dir).await?;
    let (base, dir) = (base.clone(), dir.to_path_buf());
    let previous = previous.elder.clone();
    let started = std::time::Instant::now();
    let session = tokio::task::spawn_blocking(move || {
        EditSession::open_after(&base, &dir, None, Some(&previous))
    })
    .await
    .context("opening an installed generation")??;
    Ok((session, done, started.elapsed()))
}

/// Runs the server until SIGTERM or Ctrl-C (or a failed start, returned as the error).
pub fn run(opts: ServeOptions) -> Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0,
        ])
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_metrics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(opts, metrics))
}

/// The `# HELP` lines of `/metrics`.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("elder_requests_total", "HTTP requests by route and status");
    describe_histogram!(
        "elder_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by route"
    );
    describe_counter!("elder_edits_accepted_total", "edits durably logged (202)");
    describe_counter!("elder_edits_committed_total", "edits trained and committed");
    describe_counter!("elder_edits_failed_total", "edits whose training failed");
    describe_counter!("elder_edits_deleted_total", "edits rolled back");
    describe_counter!(
        "elder_published_bytes_total",
        Unit::Bytes,
        "bytes a leader uploaded to the object store (the chunks it lacked)"
    );
    describe_gauge!("elder_edit_queue_depth", "edits waiting for the trainer");
    describe_histogram!(
        "elder_edit_training_seconds",
        Unit::Seconds,
        "time to train and commit one unit of work (a batch of edits or a rollback)"
    );
    describe_gauge!(
        "elder_state_generation",
        "the generation queries are answered from"
    );
    describe_counter!(
        "elder_answers_total",
        "answers (completions, scores) by scope"
    );
    describe_counter!(
        "elder_cpu_product_flop_total",
        "floating-point operations of the CPU's matrix products since the server started \
         (training and answers; a GPU's work is not counted)"
    );
}

async fn serve(opts: ServeOptions, metrics: PrometheusHandle) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .with_context(|| format!("listening on {}", opts.addr))?;
    let local = listener.local_addr()?;
    println!("listening on http://{local}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let shared = Arc::new(Shared::new(&opts, metrics, format!("http://{local}")));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    {
        let (shared, opts, stop_tx, load_error) = (
            shared.clone(),
            opts.clone(),
            stop_tx.clone(),
            load_error.clone(),
        );
        tokio::task::spawn_blocking(move || {
            if let Err(e) = load(&shared, &opts) {
                *load_error.lock().expect("error lock") = Some(e);
                let _ = stop_tx.send(true);
            }
        });
    }
    tokio::spawn(async move {
        wait_for_signal().await;
        eprintln!("shutting down: finishing the running edit batch and in-flight requests");
        let _ = stop_tx.send(true);
    });

    let app = api::router(shared.clone());
    let stopping = shared.clone();
    http::serve(listener, app, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
        stopping.begin_shutdown();
    })
    .await;

    shared.begin_shutdown();
    let trainer = shared.trainer.lock().expect("trainer lock").take();
    if let Some(handle) = trainer {
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .ok()
            .and_then(Result::ok)
            .context("the trainer thread panicked")?;
    }
    let failed = load_error.lock().expect("error lock").take();
    match failed {
        Some(e) => Err(e),
        None => {
            eprintln!("stopped at generation {}", shared.served().generation);
            Ok(())
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
