//! Serving replicas that follow one durable edit log on NATS JetStream (`--edit-log nats://...`).
//!
//! Three JetStream objects, named after `--stream NAME`:
//! - stream `NAME_EDITS` (subject `NAME.edits`): the edit log, one message per `add`/`delete`
//!   entry of [`super::editlog`], message id `add:<id>` / `delete:<id>` (a retried publish is
//!   deduplicated) and `Nats-Expected-Last-Sequence` (two leaders cannot both append);
//! - stream `NAME_COMMITS` (subject `NAME.commits`): one [`CommitRecord`] per generation the
//!   leader committed (and one when a leader takes over), also with an expected-sequence check;
//! - object store `NAME_STATE`: the published generations' state files as content-defined
//!   chunks, `c/<sha256>` ([`super::chunks`]): a generation uploads only the chunks the store
//!   lacks (what it changed), and a replica fetches only the chunks its own files lack. The store
//!   keeps the chunks of the newest `--keep-generations` generations; the leader deletes the rest
//!   as generations leave that window. (Records published before chunking name whole-file
//!   objects, `g<generation>/<file>`; they are still read, and deleted the same way.)
//!
//! The leader appends edits (a 202 only after JetStream acknowledged the append), trains in log
//! order, commits locally, uploads the generation and publishes its record. A replica follows
//! the commit records in order, fetches each generation, checks every file against the
//! manifest's SHA-256 sums, installs it with a commit's protocol and swaps it in whole. A new
//! leader (same stream, any state folder) installs the newest published generation if its own
//! is older, announces itself (which fences the previous leader: its next append fails the
//! expected-sequence check) and resumes training from the first uncommitted log entry.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use serde::{Deserialize, Serialize};

use super::chunks::{self, ChunkIndex, Cut, Digest};
use super::editlog::Entry;
use crate::elder::state;

/// `--role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Leader,
    Replica,
}

/// `--edit-log nats://...`, `--stream`, `--role`.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub urls: Vec<String>,
    pub stream: String,
    pub role: Role,
    /// JetStream replicas of the streams and the object store (3 on a 3-node cluster).
    pub replicas: usize,
    /// Generations whose files the object store keeps (the newest; at least 1). A replica
    /// further behind goes on with the oldest one still kept.
    pub keep_generations: usize,
}

/// One published generation (or a leader's announcement, with no files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub generation: u64,
    /// Edits this generation applied and the edit-log sequence numbers they came from.
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub seqs: Vec<u64>,
    /// An edit this generation rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<String>,
    /// The object holding the generation's manifest (its files' SHA-256 sums inside), and the
    /// objects holding the files; absent for an announcement. The manifest travels as an object,
    /// not in the record: it grows with the edits (about 20 bytes each), and a record must stay
    /// under the server's message size (1 MiB by default) at any number of edits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_file: Option<ShippedFile>,
    /// The manifest's text inline (records written before `manifest_file`; still read).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest: String,
    #[serde(default)]
    pub files: Vec<ShippedFile>,
    /// Where the leader that published this answers (`POST /v1/edits` on a replica names it).
    pub leader: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShippedFile {
    pub name: String,
    pub sha256: String,
    /// The whole file as one object (records published before files were chunked; still read).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub object: String,
    /// The file as content-defined chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunked: Option<Chunked>,
}

/// A file shipped as chunks (objects `c/<sha256>`): its size and the chunks of its chunk list
/// (the list of its own chunks' digests, shipped as chunks too; see [`super::chunks`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunked {
    pub size: u64,
    pub list: Vec<String>,
}

/// An object the store no longer holds (a generation that left the retention window).
#[derive(Debug, thiserror::Error)]
#[error("{0} is no longer in the object store")]
pub struct Gone(pub String);

/// Whether `e` says an object is gone (rather than, say, a node that did not answer).
pub fn is_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Gone>())
}

/// What one generation's upload referenced and added.
#[derive(Default)]
struct Shipment {
    /// Every chunk the generation's files (and their chunk lists) are made of.
    chunks: HashSet<Digest>,
    /// Whole-file objects it names (records before chunking; none for new ones).
    objects: Vec<String>,
    bytes: usize,
    new_bytes: usize,
    new_chunks: usize,
}

/// The generations the object store keeps, oldest first, with what each references.
struct Retention {
    keep: usize,
    kept: VecDeque<(u64, Shipment)>,
}

impl Retention {
    /// Adds the generations (each replacing an earlier record of it) and returns what the
    /// generations that left the window referenced and no kept generation does. All at once:
    /// what a dropped generation shares with any generation kept in the end stays.
    fn push(&mut self, shipments: Vec<(u64, Shipment)>) -> (Vec<Digest>, Vec<String>) {
        for (generation, shipment) in shipments {
            self.kept.retain(|(g, _)| *g != generation);
            self.kept.push_back((generation, shipment));
        }
        self.kept.make_contiguous().sort_by_key(|(g, _)| *g);
        let mut dropped = Vec::new();
        while self.kept.len() > self.keep.max(1) {
            dropped.extend(self.kept.pop_front());
        }
        let still: HashSet<&Digest> = self.kept.iter().flat_map(|(_, s)| &s.chunks).collect();
        let kept_objects: HashSet<&String> =
            self.kept.iter().flat_map(|(_, s)| &s.objects).collect();
        let mut chunks: Vec<Digest> = dropped
            .iter()
            .flat_map(|(_, s)| &s.chunks)
            .filter(|d| !still.contains(d))
            .copied()
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        let objects = dropped
            .iter()
            .flat_map(|(_, s)| &s.objects)
            .filter(|o| !kept_objects.contains(o))
            .cloned()
            .collect();
        (chunks, objects)
    }
}

/// The JetStream side of a server.
pub struct Nats {
    js: jetstream::Context,
    edits: stream::Stream,
    commits: stream::Stream,
    store: jetstream::object_store::ObjectStore,
    /// The object store's own stream (its chunks are read from it directly).
    object_stream: stream::Stream,
    edits_subject: String,
    commits_subject: String,
    /// Chunks known to be in the object store (uploaded or seen there), so that each is looked
    /// up once per leader rather than once per generation.
    stored: Mutex<HashSet<Digest>>,
    retention: Mutex<Retention>,
    /// A replica's chunks of the generation it installed last.
    local: Mutex<Option<LocalChunks>>,
}

/// Why an append or a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("another leader wrote to the edit log (expected sequence {expected}); this server stopped taking edits")]
    Fenced { expected: u64 },
    #[error("{0:#}")]
    Other(anyhow::Error),
}

const RETRIES: usize = 60;

impl Nats {
    /// Connects (retrying while the servers start) and makes the streams and the object store
    /// if they do not exist.
    pub async fn connect(opts: &NatsOptions) -> Result<Nats> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(opts.urls.clone())
            .await
            .with_context(|| format!("connecting to NATS at {}", opts.urls.join(",")))?;
        let js = jetstream::new(client);
        let name = &opts.stream;
        let edits_subject = format!("{name}.edits");
        let commits_subject = format!("{name}.commits");
        let stream_config = |stream: String, subject: &str| stream::Config {
            name: stream,
            subjects: vec![subject.to_string()],
            storage: stream::StorageType::File,
            num_replicas: opts.replicas.max(1),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        // A cluster elects its JetStream leader a few seconds after it starts: retry.
        let mut tries = 0;
        let (edits, commits, store, object_stream) = loop {
            let made = async {
                let edits = js
                    .get_or_create_stream(stream_config(format!("{name}_EDITS"), &edits_subject))
                    .await?;
                let commits = js
                    .get_or_create_stream(stream_config(
                        format!("{name}_COMMITS"),
                        &commits_subject,
                    ))
                    .await?;
                let bucket = format!("{name}_STATE");
                let store = match js.get_object_store(&bucket).await {
                    Ok(s) => s,
                    Err(_) => {
                        js.create_object_store(jetstream::object_store::Config {
                            bucket: bucket.clone(),
                            num_replicas: opts.replicas.max(1),
                            ..Default::default()
                        })
                        .await?
                    }
                };
                let object_stream = js.get_stream(format!("OBJ_{bucket}")).await?;
                Ok::<_, anyhow::Error>((edits, commits, store, object_stream))
            }
            .await;
            match made {
                Ok(x) => break x,
                Err(e) if tries < RETRIES => {
                    tries += 1;
                    eprintln!("note: JetStream not ready ({e:#}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.context("setting up the JetStream streams")),
            }
        };
        Ok(Nats {
            js,
            edits,
            commits,
            store,
            object_stream,
            edits_subject,
            commits_subject,
            stored: Mutex::new(HashSet::new()),
            retention: Mutex::new(Retention {
                keep: opts.keep_generations.max(1),
                kept: VecDeque::new(),
            }),
            local: Mutex::new(None),
        })
    }

    /// Every message of a stream, in order, with its sequence number.
    async fn read_stream(stream: &stream::Stream) -> Result<Vec<(u64, Vec<u8>)>> {
        let info = stream.get_info().await.context("reading a stream's info")?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut out = Vec::new();
        for seq in first.max(1)..=last {
            match stream.get_raw_message(seq).await {
                Ok(m) => out.push((seq, m.payload.to_vec())),
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading message {seq}")),
            }
        }
        Ok(out)
    }

    /// The edit log's entries, in order, with the log's last sequence number.
    pub async fn edit_log(&self) -> Result<(Vec<Entry>, u64)> {
        let mut entries = Vec::new();
        let mut last = 0;
        for (seq, payload) in Self::read_stream(&self.edits).await? {
            let mut entry: Entry = serde_json::from_slice(&payload)
                .with_context(|| format!("edit log message {seq} is not an entry"))?;
            // The stream's sequence is the entry's.
            match &mut entry {
                Entry::Add { seq: s, .. } | Entry::Delete { seq: s, .. } => *s = seq,
                _ => {}
            }
            entries.push(entry);
            last = seq;
        }
        Ok((entries, last))
    }

    /// The commit records, in order, with their sequence numbers in the commits stream.
    pub async fn commits_from(&self, from: u64) -> Result<Vec<(u64, CommitRecord)>> {
        let info = self
            .commits
            .get_info()
            .await
            .context("reading the commits stream")?;
        let mut out = Vec::new();
        for seq in from.max(info.state.first_sequence).max(1)..=info.state.last_sequence {
            match self.commits.get_raw_message(seq).await {
                Ok(m) => out.push((
                    seq,
                    serde_json::from_slice(&m.payload)
                        .with_context(|| format!("commit record {seq} is damaged"))?,
                )),
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading commit record {seq}")),
            }
        }
        Ok(out)
    }

    /// Appends entries to the edit log after `last`: the promises (`add`, `delete`) and the one
    /// outcome a commit record cannot carry, a batch that `failed` (no generation records it, and
    /// without it a new leader would train the batch again and forget its error). `committed`
    /// and `deleted` travel in the commit records. Returns the new last sequence; fails as
    /// [`LogError::Fenced`] when another writer appended in between.
    pub async fn append(&self, entries: &[Entry], mut last: u64) -> Result<u64, LogError> {
        for entry in entries {
            let message_id = match entry {
                Entry::Add { id, .. } => format!("add:{id}"),
                Entry::Delete { id, .. } => format!("delete:{id}"),
                // Named by the position it follows: a retried publish is deduplicated, a later
                // failure of the same edit (submitted again) is not.
                Entry::Failed { .. } => format!("failed:{}", last + 1),
                _ => continue,
            };
            let payload = serde_json::to_vec(entry).map_err(|e| LogError::Other(e.into()))?;
            let message = PublishMessage::build()
                .payload(payload.into())
                .message_id(message_id)
                .expected_last_sequence(last);
            last = publish(&self.js, &self.edits_subject, message, last).await?;
        }
        Ok(last)
    }

    /// Takes the edit log over: appends a leader marker after `last` (the log as this leader
    /// read it). Every earlier writer's next append then fails its sequence check. `Fenced`
    /// here means someone appended since `last`: read the log again and retry.
    pub async fn take_over(&self, leader: &str, last: u64) -> Result<u64, LogError> {
        let entry = Entry::Leader {
            leader: leader.to_string(),
        };
        let payload = serde_json::to_vec(&entry).map_err(|e| LogError::Other(e.into()))?;
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("leader:{leader}:{last}"))
            .expected_last_sequence(last);
        publish(&self.js, &self.edits_subject, message, last).await
    }

    /// Uploads the current generation of the state in `dir` (the chunks the store lacks) and
    /// publishes its record after `last` in the commits stream; returns the record's sequence
    /// number. Then the generations that left the retention window are deleted (a failure there
    /// is only reported: the next generation tries again).
    pub async fn publish_generation(
        &self,
        dir: &Path,
        mut record: CommitRecord,
        last: u64,
    ) -> Result<u64, LogError> {
        let (manifest, files) = state::generation_files(dir).map_err(LogError::Other)?;
        let mut shipment = Shipment::default();
        for f in &files {
            record.files.push(
                self.ship(&f.name, &f.sha256, &f.bytes, &mut shipment)
                    .await?,
            );
        }
        let manifest_sum = sha256_hex(manifest.as_bytes());
        record.manifest_file = Some(
            self.ship(
                MANIFEST_OBJECT,
                &manifest_sum,
                manifest.as_bytes(),
                &mut shipment,
            )
            .await?,
        );
        let seq = self.publish_record(&record, last).await?;
        eprintln!(
            "published generation {}: {} of {} bytes new ({} of {} chunks)",
            record.generation,
            shipment.new_bytes,
            shipment.bytes,
            shipment.new_chunks,
            shipment.chunks.len()
        );
        metrics::counter!("elder_published_bytes_total").increment(shipment.new_bytes as u64);
        self.retire(vec![(record.generation, shipment)], true).await;
        Ok(seq)
    }

    /// Uploads the chunks of one file (and of its chunk list) that the store lacks; `sha256` is
    /// the file's, as its manifest gives it (already checked: not hashed again here).
    async fn ship(
        &self,
        name: &str,
        sha256: &str,
        bytes: &[u8],
        shipment: &mut Shipment,
    ) -> Result<ShippedFile, LogError> {
        let cut = chunks::cut(bytes);
        let list = chunks::list_bytes(cut.iter().map(|(d, _)| *d));
        let list_cut = chunks::cut(&list);
        for (d, range) in &cut {
            self.put_chunk(d, &bytes[range.clone()], shipment).await?;
        }
        for (d, range) in &list_cut {
            self.put_chunk(d, &list[range.clone()], shipment).await?;
        }
        Ok(ShippedFile {
            name: name.to_string(),
            sha256: sha256.to_string(),
            object: String::new(),
            chunked: Some(Chunked {
                size: bytes.len() as u64,
                list: list_cut.iter().map(|(d, _)| chunks::to_hex(d)).collect(),
            }),
        })
    }

    async fn put_chunk(
        &self,
        d: &Digest,
        bytes: &[u8],
        shipment: &mut Shipment,
    ) -> Result<(), LogError> {
        shipment.bytes += bytes.len();
        if !shipment.chunks.insert(*d) || self.stored.lock().expect("chunks lock").contains(d) {
            return Ok(());
        }
        let object = chunk_object(d);
        let present = matches!(self.store.info(&object).await, Ok(info) if !info.deleted);
        if !present {
            self.store
                .put(object.as_str(), &mut &bytes[..])
                .await
                .map_err(|e| LogError::Other(anyhow::anyhow!("uploading {object}: {e}")))?;
            shipment.new_bytes += bytes.len();
            shipment.new_chunks += 1;
        }
        self.stored.lock().expect("chunks lock").insert(*d);
        Ok(())
    }

    /// Keeps the generations in the retention window and deletes what the generations that left
    /// it referenced and no kept generation does (`delete` false: only the window moves).
    async fn retire(&self, shipments: Vec<(u64, Shipment)>, delete: bool) {
        let (chunks, objects) = self
            .retention
            .lock()
            .expect("retention lock")
            .push(shipments);
        if !delete {
            return;
        }
        for d in &chunks {
            self.stored.lock().expect("chunks lock").remove(d);
        }
        let names = chunks.iter().map(chunk_object).chain(objects);
        let mut failed = 0;
        for name in names {
            match self.store.delete(&name).await {
                Ok(()) => {}
                Err(e) if e.kind() == jetstream::object_store::DeleteErrorKind::NotFound => {}
                Err(e) => {
                    failed += 1;
                    if failed == 1 {
                        eprintln!("warning: deleting {name} from the object store: {e}");
                    }
                }
            }
        }
        if failed > 1 {
            eprintln!("warning: {failed} objects could not be deleted from the object store");
        }
    }

    /// A new leader takes over the retention window from the records published before it:
    /// the newest `keep` generations are kept (their chunk lists are read to know what they
    /// reference), and everything older is deleted.
    pub async fn adopt_published(&self, records: &[CommitRecord]) {
        let mut newest: Vec<&CommitRecord> =
            records.iter().filter(|r| !r.files.is_empty()).collect();
        newest.sort_by_key(|r| r.generation);
        // One record per generation (the last published).
        let mut by_generation: Vec<&CommitRecord> = Vec::new();
        for r in newest {
            match by_generation.last_mut() {
                Some(last) if last.generation == r.generation => *last = r,
                _ => by_generation.push(r),
            }
        }
        let mut shipments = Vec::new();
        let mut unreadable = false;
        for r in by_generation {
            let mut shipment = Shipment::default();
            for f in r.files.iter().chain(&r.manifest_file) {
                match self.referenced(f, &mut shipment).await {
                    Ok(()) => {}
                    // Already deleted (it left the window before): nothing of it to keep.
                    Err(e) if is_gone(&e) => {}
                    Err(e) => {
                        eprintln!(
                            "warning: reading what generation {} references: {e:#}",
                            r.generation
                        );
                        unreadable = true;
                    }
                }
            }
            shipments.push((r.generation, shipment));
        }
        // A generation whose references could not be read might share any chunk: then nothing
        // is deleted this time (the next published generation deletes what it can).
        if unreadable {
            eprintln!("note: the object store is not cleaned at this start (see the warnings)");
        }
        self.retire(shipments, !unreadable).await;
    }

    /// Adds what a shipped file references (its chunks, or its whole-file object) to `shipment`.
    async fn referenced(&self, f: &ShippedFile, shipment: &mut Shipment) -> Result<()> {
        let Some(c) = &f.chunked else {
            shipment.objects.push(f.object.clone());
            return Ok(());
        };
        let mut index = ChunkIndex::default();
        let list_chunks = hex_digests(&c.list)?;
        shipment.chunks.extend(list_chunks.iter().copied());
        self.fetch_missing(&list_chunks, &mut index).await?;
        shipment
            .chunks
            .extend(chunks::parse_list(&index.assemble(&list_chunks)?)?);
        Ok(())
    }

    /// Publishes a commit record (or an announcement) after `last`.
    pub async fn publish_record(&self, record: &CommitRecord, last: u64) -> Result<u64, LogError> {
        let payload = serde_json::to_vec(record).map_err(|e| LogError::Other(e.into()))?;
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(format!(
                "commit:{}:{}:{}",
                record.generation,
                record.files.len(),
                record.leader
            ))
            .expected_last_sequence(last);
        publish(&self.js, &self.commits_subject, message, last).await
    }

    /// An object's bytes, read chunk by chunk with direct gets (answered by any replica of the
    /// object store's stream, so no consumer has to be created: after a node of a cluster goes
    /// away, creating one waits for a new meta leader, while direct gets go on).
    async fn fetch(&self, object: &str) -> Result<Vec<u8>> {
        let info = match self.store.info(object).await {
            Ok(info) if !info.deleted => info,
            Ok(_) => return Err(Gone(object.to_string()).into()),
            Err(e) if e.kind() == jetstream::object_store::InfoErrorKind::NotFound => {
                return Err(Gone(object.to_string()).into())
            }
            Err(e) => return Err(e).with_context(|| format!("looking up {object}")),
        };
        let subject = format!("$O.{}.C.{}", info.bucket, info.nuid);
        let mut bytes = Vec::with_capacity(info.size);
        let mut next = None;
        for _ in 0..info.chunks {
            let chunk = self
                .object_stream
                .direct_get_next_for_subject(subject.clone(), next)
                .await
                .with_context(|| format!("reading {object}"))?;
            bytes.extend_from_slice(&chunk.payload);
            next = Some(chunk.sequence + 1);
        }
        anyhow::ensure!(
            bytes.len() == info.size,
            "{object}: read {} bytes, its info says {}",
            bytes.len(),
            info.size
        );
        Ok(bytes)
    }

    /// Fetches a published generation's files and installs them into `dir` (checked against
    /// the manifest's sums). Only the chunks that the state already in `dir` lacks are fetched.
    pub async fn install(&self, record: &CommitRecord, dir: &Path) -> Result<Installed> {
        let cached = self.local.lock().expect("local chunks lock").take();
        let mut index = {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || local_chunks(&dir, cached))
                .await
                .context("reading the state's own chunks")?
        };
        let mut files = Vec::new();
        let mut cuts = Vec::new();
        let mut legacy = 0;
        for f in record.files.iter().chain(&record.manifest_file) {
            let (bytes, cut) = self.fetch_file(f, &mut index).await?;
            if cut.is_none() {
                legacy += bytes.len();
            }
            files.push((f.name.clone(), bytes));
            cuts.push(cut);
        }
        let (manifest, manifest_cut) = match &record.manifest_file {
            Some(_) => {
                let (_, bytes) = files.pop().expect("the manifest was fetched last");
                let text = String::from_utf8(bytes).with_context(|| {
                    format!(
                        "the manifest of generation {} is not UTF-8",
                        record.generation
                    )
                })?;
                (text, cuts.pop().flatten())
            }
            None => (record.manifest.clone(), None),
        };
        let bytes = files.iter().map(|(_, b)| b.len()).sum::<usize>() + manifest.len();
        let fetched = index.added_bytes() + legacy;
        let dir = dir.to_path_buf();
        let (generation, files, manifest) = tokio::task::spawn_blocking(move || {
            let done = state::install_generation(&dir, &manifest, &files);
            (done.map(|g| (g, dir)), files, manifest)
        })
        .await
        .context("installing a generation")?;
        let (generation, dir) = generation?;
        // The installed files are the next install's chunks at hand, cut as they were fetched.
        let mut next = ChunkIndex::default();
        let manifest_sha256 = sha256_hex(manifest.as_bytes());
        let shipped = files.into_iter().map(|(_, bytes)| bytes);
        for (bytes, cut) in shipped
            .chain([manifest.into_bytes()])
            .zip(cuts.into_iter().chain([manifest_cut]))
        {
            match cut {
                Some(cut) => {
                    next.add_list_of(&cut);
                    next.add_cut_file(bytes, cut)
                }
                None => next.add_file(bytes),
            }
        }
        *self.local.lock().expect("local chunks lock") = Some(LocalChunks {
            dir,
            manifest_sha256,
            index: next,
        });
        Ok(Installed {
            generation,
            bytes,
            fetched,
        })
    }

    /// The chunk objects the store holds (`c/<sha256>`, deleted ones left out), by name.
    pub async fn stored_chunks(&self) -> Result<HashSet<String>> {
        use tokio_stream::StreamExt;
        let mut list = self
            .store
            .list()
            .await
            .context("listing the object store")?;
        let mut out = HashSet::new();
        while let Some(info) = list.next().await {
            let info = info.context("listing the object store")?;
            if !info.deleted && info.name.starts_with("c/") {
                out.insert(info.name);
            }
        }
        Ok(out)
    }
}

/// What installing a generation took.
#[derive(Debug, Clone, Copy)]
pub struct Installed {
    pub generation: u64,
    /// The generation's files (its manifest included), in bytes.
    pub bytes: usize,
    /// The bytes fetched for it (the rest came from the files the state had).
    pub fetched: usize,
}

impl Nats {
    /// A shipped file's bytes and, for a chunked one, its cut. Every chunk is checked against
    /// its name and the chunk list's chunks are named by the record, so the bytes are the ones
    /// the leader shipped (installing checks them against the manifest's sums once more).
    async fn fetch_file(
        &self,
        f: &ShippedFile,
        index: &mut ChunkIndex,
    ) -> Result<(Vec<u8>, Option<Cut>)> {
        let Some(c) = &f.chunked else {
            return Ok((self.fetch_checked(f).await?, None));
        };
        let list_chunks = hex_digests(&c.list)?;
        self.fetch_missing(&list_chunks, index).await?;
        let list = chunks::parse_list(&index.assemble(&list_chunks)?)?;
        self.fetch_missing(&list, index).await?;
        let (bytes, cut) = index.assemble_cut(&list)?;
        if bytes.len() as u64 != c.size {
            bail!(
                "{}: its chunks make {} bytes, its commit record says {}",
                f.name,
                bytes.len(),
                c.size
            );
        }
        Ok((bytes, Some(cut)))
    }

    /// Fetches the chunks of `wanted` that `index` lacks (each checked against its name).
    async fn fetch_missing(&self, wanted: &[Digest], index: &mut ChunkIndex) -> Result<()> {
        for d in index.missing(wanted) {
            let object = chunk_object(&d);
            let bytes = tokio::time::timeout(FETCH_PATIENCE, self.fetch(&object))
                .await
                .map_err(|_| anyhow::anyhow!("fetching {object} timed out"))??;
            index.add_chunk(d, bytes)?;
        }
        Ok(())
    }

    /// A whole-file object's bytes, checked against the sha256 its commit record gives.
    async fn fetch_checked(&self, f: &ShippedFile) -> Result<Vec<u8>> {
        let bytes = tokio::time::timeout(FETCH_PATIENCE, self.fetch(&f.object))
            .await
            .map_err(|_| anyhow::anyhow!("fetching {} timed out", f.object))??;
        if sha256_hex(&bytes) != f.sha256 {
            bail!(
                "{} does not match the sha256 its commit record gives",
                f.object
            );
        }
        Ok(bytes)
    }
}

/// The chunks of the generation a replica installed last (see [`Nats::install`]).
struct LocalChunks {
    dir: std::path::PathBuf,
    /// The SHA-256 of that generation's manifest (which holds its files' sums).
    manifest_sha256: String,
    index: ChunkIndex,
}

/// The chunks of the state's current generation in `dir`: those kept from the last install when
/// that is still what `dir` holds, else read and cut from its files (none for a new or
/// unreadable state: then every chunk is fetched).
fn local_chunks(dir: &Path, cached: Option<LocalChunks>) -> ChunkIndex {
    let current = std::fs::read(dir.join(state::MANIFEST_FILE)).ok();
    if let (Some(text), Some(c)) = (&current, cached) {
        if c.dir == dir && c.manifest_sha256 == sha256_hex(text) {
            return c.index;
        }
    }
    let mut index = ChunkIndex::default();
    if let Ok((manifest, files)) = state::generation_files(dir) {
        for f in files {
            index.add_file_with_list(f.bytes);
        }
        index.add_file_with_list(manifest.into_bytes());
    }
    index
}

fn hex_digests(list: &[String]) -> Result<Vec<Digest>> {
    list.iter().map(|h| chunks::from_hex(h)).collect()
}

/// The object that holds the chunk named `d`.
pub fn chunk_object(d: &Digest) -> String {
    format!("c/{}", chunks::to_hex(d))
}

/// The name a generation's manifest is shipped under (beside its files).
const MANIFEST_OBJECT: &str = "manifest.json";

/// How long fetching one object may take before the follower tries again.
const FETCH_PATIENCE: Duration = Duration::from_secs(10);

/// Publishes with an expected-sequence check; transient failures (a cluster electing a new
/// stream leader after a node went away, a lost acknowledgement) are retried for up to
/// [`PUBLISH_PATIENCE`]: every message carries a message id, so a retry of a publish that did
/// land is answered as a duplicate, not appended twice.
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    message: PublishMessage,
    last: u64,
) -> Result<u64, LogError> {
    let deadline = tokio::time::Instant::now() + PUBLISH_PATIENCE;
    loop {
        let ack = async {
            js.send_publish(subject.to_string(), message.clone())
                .await
                .map_err(|e| (e.kind(), e.to_string()))?
                .await
                .map_err(|e| (e.kind(), e.to_string()))
        }
        .await;
        match ack {
            Ok(ack) if ack.duplicate => return Ok(last.max(ack.sequence)),
            Ok(ack) => return Ok(ack.sequence),
            Err((PublishErrorKind::WrongLastSequence, _)) => {
                return Err(LogError::Fenced { expected: last })
            }
            Err((_, e)) if tokio::time::Instant::now() >= deadline => {
                return Err(LogError::Other(anyhow::anyhow!(
                    "publishing to {subject}: {e}"
                )))
            }
            Err((_, e)) => {
                eprintln!("note: publishing to {subject}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// How long a publish keeps retrying transient failures.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(20);

fn sha256_hex(bytes: &[u8]) -> String {
    chunks::to_hex(&chunks::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(edits: usize) -> CommitRecord {
        CommitRecord {
            generation: 7,
            ids: (0..edits).map(|i| format!("edit-{i}")).collect(),
            seqs: (0..edits as u64).collect(),
            deleted: None,
            manifest_file: Some(ShippedFile {
                name: MANIFEST_OBJECT.into(),
                sha256: "ab".repeat(32),
                object: format!("g7/{MANIFEST_OBJECT}"),
                chunked: None,
            }),
            manifest: String::new(),
            files: Vec::new(),
            leader: "http://127.0.0.1:1".into(),
        }
    }

    #[test]
    fn a_commit_record_names_its_manifest_instead_of_carrying_it() {
        let json = serde_json::to_string(&record(2)).unwrap();
        assert!(json.contains("\"manifest_file\""), "{json}");
        assert!(!json.contains("\"manifest\":"), "{json}");
        let back: CommitRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record(2));
    }

    fn shipment(chunks: &[u8]) -> Shipment {
        Shipment {
            chunks: chunks.iter().map(|&c| [c; 32]).collect(),
            ..Default::default()
        }
    }

    /// The window keeps the newest generations; a dropped generation's chunks are deleted only
    /// when no kept generation has them, also when generations arrive together (a new leader
    /// adopting the records before it) and one shares a chunk only with the newest.
    #[test]
    fn retention_deletes_only_what_no_kept_generation_references() {
        let mut r = Retention {
            keep: 2,
            kept: VecDeque::new(),
        };
        assert_eq!(r.push(vec![(1, shipment(&[1, 2]))]).0, Vec::<Digest>::new());
        assert!(r.push(vec![(2, shipment(&[1, 3]))]).0.is_empty());
        // Generation 1 leaves: chunk 2 only it had, chunk 1 generation 2 has too.
        assert_eq!(r.push(vec![(3, shipment(&[1, 4]))]).0, vec![[2u8; 32]]);
        let mut adopting = Retention {
            keep: 2,
            kept: VecDeque::new(),
        };
        let (deleted, _) = adopting.push(vec![
            (10, shipment(&[7, 8])),
            (11, shipment(&[9])),
            (12, shipment(&[9, 5])),
            (13, shipment(&[7])),
        ]);
        // Chunk 7 (generations 10 and 13) stays; 8 (only 10) goes, and 9 (10 and 11's, and 12's,
        // which is kept) stays.
        assert_eq!(deleted, vec![[8u8; 32]]);
        let kept: Vec<u64> = adopting.kept.iter().map(|(g, _)| *g).collect();
        assert_eq!(kept, vec![12, 13]);
        // A generation published again replaces its earlier record.
        let (deleted, _) = adopting.push(vec![(13, shipment(&[7, 6]))]);
        assert!(deleted.is_empty());
    }

    #[test]
    fn a_record_with_an_inline_manifest_still_reads() {
        let old = r#"{"generation":3,"ids":["a"],"seqs":[1],"manifest":"{\"format\":3}","files":[],"leader":"x"}"#;
        let r: CommitRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.manifest, "{\"format\":3}");
        assert!(r.manifest_file.is_none());
    }
}
