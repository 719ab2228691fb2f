//! Serving replicas that follow one durable edit log on NATS JetStream (`--edit-log nats://...`).
//!
//! Three JetStream objects, named after `--stream NAME`:
//! - stream `NAME_EDITS` (subject `NAME.edits`): the edit log, one message per `add`/`delete`
//!   entry of [`super::editlog`], message id `add:<id>` / `delete:<id>` (a retried publish is
//!   deduplicated) and `Nats-Expected-Last-Sequence` (two leaders cannot both append);
//! - stream `NAME_COMMITS` (subject `NAME.commits`): one [`CommitRecord`] per generation the
//!   leader committed (and one when a leader takes over), also with an expected-sequence check;
//! - object store `NAME_STATE`: each published generation's state files, `g<generation>/<file>`.
//!
//! The leader appends edits (a 202 only after JetStream acknowledged the append), trains in log
//! order, commits locally, uploads the generation and publishes its record. A replica follows
//! the commit records in order, fetches each generation, checks every file against the
//! manifest's SHA-256 sums, installs it with a commit's protocol and swaps it in whole. A new
//! leader (same stream, any state folder) installs the newest published generation if its own
//! is older, announces itself (which fences the previous leader: its next append fails the
//! expected-sequence check) and resumes training from the first uncommitted log entry.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use serde::{Deserialize, Serialize};

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
    pub object: String,
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

    /// Uploads the current generation of the state in `dir` and publishes its record after
    /// `last` in the commits stream; returns the record's sequence number.
    pub async fn publish_generation(
        &self,
        dir: &Path,
        mut record: CommitRecord,
        last: u64,
    ) -> Result<u64, LogError> {
        let (manifest, files) = state::generation_files(dir).map_err(LogError::Other)?;
        for (name, bytes) in &files {
            record
                .files
                .push(self.upload(record.generation, name, bytes).await?);
        }
        record.manifest_file = Some(
            self.upload(record.generation, MANIFEST_OBJECT, manifest.as_bytes())
                .await?,
        );
        self.publish_record(&record, last).await
    }

    /// Puts one file of generation `generation` into the object store.
    async fn upload(
        &self,
        generation: u64,
        name: &str,
        bytes: &[u8],
    ) -> Result<ShippedFile, LogError> {
        let object = format!("g{generation}/{name}");
        self.store
            .put(object.as_str(), &mut &bytes[..])
            .await
            .map_err(|e| LogError::Other(anyhow::anyhow!("uploading {object}: {e}")))?;
        Ok(ShippedFile {
            name: name.to_string(),
            sha256: sha256_hex(bytes),
            object,
        })
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
        let info = self
            .store
            .info(object)
            .await
            .with_context(|| format!("looking up {object}"))?;
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
    /// the manifest's sums); returns the generation.
    pub async fn install(&self, record: &CommitRecord, dir: &Path) -> Result<u64> {
        let mut files = Vec::new();
        for f in &record.files {
            files.push((f.name.clone(), self.fetch_checked(f).await?));
        }
        let manifest = match &record.manifest_file {
            Some(f) => String::from_utf8(self.fetch_checked(f).await?)
                .with_context(|| format!("{} is not UTF-8", f.object))?,
            None => record.manifest.clone(),
        };
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || state::install_generation(&dir, &manifest, &files))
            .await
            .context("installing a generation")?
    }
}

impl Nats {
    /// A shipped file's bytes, checked against the sha256 its commit record gives.
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

/// The object name of a generation's manifest (beside its files, `g<N>/<file>`).
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
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

    #[test]
    fn a_record_with_an_inline_manifest_still_reads() {
        let old = r#"{"generation":3,"ids":["a"],"seqs":[1],"manifest":"{\"format\":3}","files":[],"leader":"x"}"#;
        let r: CommitRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.manifest, "{\"format\":3}");
        assert!(r.manifest_file.is_none());
    }
}
