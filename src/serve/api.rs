//! The HTTP layer: routes, limits, authentication, errors in OpenAI's shape, one log line and
//! the metrics of every request.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::ledger::{Acceptance, EditInfo, Refusal};
use super::queries::{Completion, Job, ScoreResult};
use super::replication::{LogError, Role};
use super::{editlog::Entry, Shared};
use crate::data::EditRecord;
use crate::model::runner::Sampling;
use crate::session::BaseModel;

type AppState = Arc<Shared>;

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

pub fn router(shared: AppState) -> Router {
    let limit = shared.limits.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/edits", post(post_edits))
        .route("/v1/edits/{id}", get(get_edit).delete(delete_edit))
        .route("/v1/completions", post(completions))
        .route("/v1/score", post(score))
        .route_layer(middleware::from_fn_with_state(shared.clone(), bounded))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authorized));
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .merge(v1)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(logged))
        .with_state(shared)
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An error as OpenAI reports it: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            code: None,
            retry_after: None,
        }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    fn invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, m)
    }
    fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    fn unavailable(m: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, m)
        }
    }
    fn busy(m: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, m)
        }
    }
    fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            429 => "rate_limit_error",
            500.. => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind(), "code": self.code}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The bytes of a request body: 413 over the body limit (`--max-body-bytes`).
fn bytes_of(bytes: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    bytes.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is over the server's limit (--max-body-bytes)".to_string()
        } else {
            r.body_text()
        };
        ApiError::new(status, message)
    })
}

/// A JSON body: 400 for bytes that are not JSON, 422 for JSON of the wrong shape (naming the
/// field).
fn json_of<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("invalid request: {e}")))
}

/// Checks a request body as its route's handler does before any model work (the fuzzers' entry:
/// `Err` carries the client's error message; nothing may panic).
pub fn check_request_body(route: &str, bytes: &[u8]) -> Result<(), String> {
    let limits = super::Limits::default();
    let checked = match route {
        "/v1/completions" => check_completion(bytes, &limits, "model").map(drop),
        "/v1/edits" => check_edits(bytes, &limits).map(drop),
        "/v1/score" => json_of::<ScoreRequest>(bytes).map(drop),
        other => return Err(format!("no route {other}")),
    };
    checked.map_err(|e| e.message)
}

// ---------------------------------------------------------------------------------------------
// Middleware

/// One log line per request, and the request metrics.
async fn logged(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    let seconds = start.elapsed().as_secs_f64();
    let status = response.status().as_u16().to_string();
    metrics::counter!("elder_requests_total", "route" => route.clone(), "status" => status.clone())
        .increment(1);
    metrics::histogram!("elder_request_duration_seconds", "route" => route).record(seconds);
    eprintln!("{method} {path} {status} {:.1} ms", seconds * 1e3);
    response
}

/// With an API key set, `/v1` and the API document need `Authorization: Bearer KEY`.
async fn authorized(State(s): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send Authorization: Bearer KEY)",
            )
            .code("invalid_api_key")
            .into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `/v1` answers only when ready, and at most `max_concurrent` requests at once (429 beyond).
async fn bounded(State(s): State<AppState>, request: Request, next: Next) -> Response {
    if !s.is_ready() {
        return ApiError::unavailable(format!("the server is {}", s.phase_name())).into_response();
    }
    let Ok(_slot) = s.request_slots.clone().try_acquire_owned() else {
        return ApiError::busy(format!(
            "{} requests are in flight (--max-concurrent); retry later",
            s.limits.max_concurrent
        ))
        .into_response();
    };
    next.run(request).await
}

// ---------------------------------------------------------------------------------------------
// Service routes

async fn ready(State(s): State<AppState>) -> Response {
    if s.is_ready() {
        let generation = s.served().generation;
        let mut body = json!({"status": "ready", "generation": generation});
        if let Some(r) = s.replication.get() {
            body["role"] = json!(match r.role {
                Role::Leader => "leader",
                Role::Replica => "replica",
            });
            body["leader"] = json!(r.leader_url());
            body["latest_generation"] = json!(r.latest_generation());
            body["lag"] = json!(r.latest_generation().saturating_sub(generation));
            body["fenced"] = json!(s.is_fenced());
        }
        Json(body).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": s.phase_name()})),
        )
            .into_response()
    }
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    // Read at scrape time: the count lives in the CPU backend, which knows nothing of metrics.
    metrics::counter!("elder_cpu_product_flop_total")
        .absolute(crate::backend::cpu::flops::flops_so_far());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn models(State(s): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": s.model_name, "object": "model", "created": unix_now(), "owned_by": "elder"}],
    }))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn base(s: &Shared) -> ApiResult<Arc<BaseModel>> {
    s.base()
        .cloned()
        .ok_or_else(|| ApiError::unavailable("the model is not loaded yet"))
}

/// A client that names a model must name the served one.
fn check_model(served: &str, model: &Option<String>) -> ApiResult<()> {
    match model {
        Some(m) if m != served => Err(ApiError::not_found(format!(
            "model {m:?} is not served here (this server serves {served:?})"
        ))
        .code("model_not_found")),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Edits

#[derive(Deserialize)]
struct EditsRequest {
    edits: Vec<Value>,
}

async fn post_edits(
    State(s): State<AppState>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    refuse_on_replica(&s)?;
    let records = check_edits(&bytes_of(bytes)?, &s.limits)?;
    let base = base(&s)?;
    for (i, record) in records.iter().enumerate() {
        // Tokenizes and checks every sequence against the model's positions (a record that
        // cannot be trained is refused now, not failed later).
        base.tokenize_edit(record).map_err(|e| {
            ApiError::bad_request(format!("edits[{i}]: {e:#}")).code("context_length_exceeded")
        })?;
    }
    let shared = s.clone();
    let accepted = tokio::task::spawn_blocking(move || {
        let result = accept_edits(&shared, records);
        fence_if(&shared, &result);
        result
    })
    .await
    .map_err(|e| ApiError::internal(format!("accepting edits: {e}")))??;
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": accepted}))).into_response())
}

/// The records of an edit request, each checked as a line of a `.jsonl` file is.
fn check_edits(bytes: &[u8], limits: &super::Limits) -> ApiResult<Vec<EditRecord>> {
    let request: EditsRequest = json_of(bytes)?;
    if request.edits.is_empty() {
        return Err(ApiError::invalid("\"edits\" is empty"));
    }
    if request.edits.len() > limits.max_items {
        return Err(ApiError::invalid(format!(
            "{} edits in one request; at most {}",
            request.edits.len(),
            limits.max_items
        )));
    }
    request
        .edits
        .iter()
        .enumerate()
        .map(|(i, value)| {
            crate::data::record_from_json(value)
                .map_err(|e| ApiError::invalid(format!("edits[{i}]: {e}")))
        })
        .collect()
}

/// Logs the request's new edits durably (one append, fsynced), then queues them.
fn accept_edits(s: &Shared, records: Vec<EditRecord>) -> ApiResult<Vec<Value>> {
    let limit = s.limits.max_queued_edits;
    s.with_book(|ledger, log| {
        let decisions = ledger.check_add(&records, limit).map_err(refusal)?;
        let mut seq = log.next_seq();
        let mut new: Vec<(u64, EditRecord)> = Vec::new();
        let mut answer = Vec::with_capacity(records.len());
        for (record, decision) in records.into_iter().zip(decisions) {
            let given = match decision {
                Acceptance::Existing(seq) => seq,
                // A repeated id within the request is logged once.
                Acceptance::New => match new.iter().find(|(_, r)| r.id == record.id) {
                    Some((seq, _)) => *seq,
                    None => {
                        new.push((seq, record.clone()));
                        seq += 1;
                        seq - 1
                    }
                },
            };
            answer.push(json!({"id": record.id, "seq": given}));
        }
        let entries: Vec<Entry> = new
            .iter()
            .map(|(seq, r)| {
                Ok(Entry::Add {
                    seq: *seq,
                    id: r.id.clone(),
                    record: serde_json::to_value(r)?,
                })
            })
            .collect::<serde_json::Result<_>>()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if !entries.is_empty() {
            log.append(&entries).map_err(refused_append)?;
        }
        metrics::counter!("elder_edits_accepted_total").increment(new.len() as u64);
        for (seq, r) in new {
            ledger.accept_add(seq, r);
        }
        Ok(answer)
    })
    .map_err(ApiError::unavailable)?
}

/// An append the log refused: nothing was acknowledged. A fenced leader (another one took
/// over the JetStream log) is told so, and stops taking edits once the lock is released.
fn refused_append(e: LogError) -> ApiError {
    match e {
        LogError::Fenced { .. } => {
            ApiError::new(StatusCode::CONFLICT, e.to_string()).code("fenced")
        }
        LogError::Other(e) => ApiError::internal(format!("not accepted: {e:#}")),
    }
}

/// After a request: a refused append because another leader took over fences this server.
fn fence_if<T>(s: &Shared, result: &ApiResult<T>) {
    if let Err(e) = result {
        if e.code == Some("fenced") {
            s.fence();
        }
    }
}

/// Edits go to the leader; a replica answers 421 naming it.
fn refuse_on_replica(s: &Shared) -> ApiResult<()> {
    match s.replica_of() {
        Some(leader) => Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this server is a replica; send edits to the leader{}",
                if leader.is_empty() {
                    " (none has announced itself yet)".to_string()
                } else {
                    format!(" at {leader}")
                }
            ),
        )
        .code("not_leader")),
        None => Ok(()),
    }
}

fn refusal(r: Refusal) -> ApiError {
    match r {
        Refusal::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m).code("conflict"),
        Refusal::NotFound(m) => ApiError::not_found(m),
        Refusal::QueueFull { queued, limit } => ApiError::busy(format!(
            "{queued} edits are queued and the queue holds {limit} (--max-queued-edits); retry later"
        ))
        .code("edit_queue_full"),
    }
}

fn edit_json(id: &str, e: &EditInfo) -> Value {
    json!({"id": id, "status": e.status, "seq": e.seq, "generation": e.generation, "error": e.error})
}

async fn get_edit(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    s.with_ledger(|l| l.get(&id).map(|e| edit_json(&id, e)))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no edit {id:?}")))
}

async fn delete_edit(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    refuse_on_replica(&s)?;
    if let Some(why) = s.forget_unsupported() {
        return Err(ApiError::invalid(why).code("rollback_unsupported"));
    }
    let shared = s.clone();
    let (status, info) = tokio::task::spawn_blocking(move || {
        let result = shared
            .with_book(|ledger, log| {
                if ledger.check_delete(&id).map_err(refusal)? {
                    let seq = log.next_seq();
                    log.append(&[Entry::Delete {
                        seq,
                        id: id.clone(),
                    }])
                    .map_err(refused_append)?;
                    ledger.accept_delete(&id);
                    let info = ledger.get(&id).expect("known").clone();
                    let mut v = edit_json(&id, &info);
                    v["seq"] = json!(seq);
                    Ok((StatusCode::ACCEPTED, v))
                } else {
                    Ok((
                        StatusCode::OK,
                        edit_json(&id, ledger.get(&id).expect("known")),
                    ))
                }
            })
            .map_err(ApiError::unavailable)
            .and_then(|r| r);
        fence_if(&shared, &result);
        result
    })
    .await
    .map_err(|e| ApiError::internal(format!("rolling back: {e}")))??;
    Ok((status, Json(info)).into_response())
}

// ---------------------------------------------------------------------------------------------
// Completions and scores

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: OneOrMany,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    min_generation: Option<u64>,
    n: Option<usize>,
}

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;
/// OpenAI's default temperature.
const DEFAULT_TEMPERATURE: f32 = 1.0;
const MAX_STOPS: usize = 4;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

async fn completions(
    State(s): State<AppState>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let r = check_completion(&bytes_of(bytes)?, &s.limits, &s.model_name)?;
    let base = base(&s)?;
    let (prompts, stops, max_tokens, temperature) =
        (r.prompts, r.stops, r.max_tokens, r.temperature);
    let mut ids = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let tokens = base
            .tokenizer
            .encode(p)
            .map_err(|e| ApiError::invalid(format!("prompt {i}: {e:#}")))?;
        if tokens.is_empty() {
            return Err(ApiError::invalid(format!("prompt {i} has no tokens")));
        }
        base.cfg
            .check_context(&[("the prompt", tokens.len()), ("max_tokens", max_tokens)])
            .map_err(|e| {
                ApiError::bad_request(format!("prompt {i}: {e:#}")).code("context_length_exceeded")
            })?;
        ids.push(tokens);
    }
    wait_for(&s, r.min_generation).await?;
    let seed = r
        .seed
        .unwrap_or_else(|| NEXT_ID.load(Ordering::Relaxed) ^ unix_now());
    let id = format!("cmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let sampling = |i: usize| Sampling {
        max_new: max_tokens,
        temperature,
        seed: seed.wrapping_add(i as u64),
    };
    let eos = base.cfg.eos_token_id.or(base.tokenizer.eos_id());
    let finish = Finisher {
        base: base.clone(),
        eos,
        stops,
    };
    if r.stream {
        let prompt = ids.remove(0);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        submit(
            &s,
            Job::Complete {
                prompt,
                sampling: sampling(0),
                tokens: Some(tx),
                reply,
            },
        )?;
        return Ok(stream(s.clone(), id, finish, rx, answer).into_response());
    }
    let mut answers = Vec::with_capacity(ids.len());
    for (i, prompt) in ids.iter().enumerate() {
        let (reply, answer) = oneshot::channel();
        submit(
            &s,
            Job::Complete {
                prompt: prompt.clone(),
                sampling: sampling(i),
                tokens: None,
                reply,
            },
        )?;
        answers.push(answer);
    }
    let mut choices = Vec::with_capacity(answers.len());
    let mut completion_tokens = 0;
    for (index, answer) in answers.into_iter().enumerate() {
        let c: Completion = answer_of(&s, answer).await?;
        let (text, reason, used) = finish.text(&c.tokens);
        completion_tokens += used;
        count_answer(c.in_scope);
        choices.push(json!({
            "index": index, "text": text, "logprobs": null, "finish_reason": reason,
            "elder": {"generation": c.generation, "in_scope": c.in_scope},
        }));
    }
    let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": unix_now(), "model": s.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }))
    .into_response())
}

fn count_answer(in_scope: bool) {
    metrics::counter!("elder_answers_total", "in_scope" => in_scope.to_string()).increment(1);
}

/// A completion request with its defaults filled in and every field checked against the limits
/// (everything but tokenization).
struct CheckedCompletion {
    prompts: Vec<String>,
    stops: Vec<String>,
    max_tokens: usize,
    temperature: f32,
    seed: Option<u64>,
    stream: bool,
    min_generation: Option<u64>,
}

fn check_completion(
    bytes: &[u8],
    limits: &super::Limits,
    served_model: &str,
) -> ApiResult<CheckedCompletion> {
    let r: CompletionRequest = json_of(bytes)?;
    check_model(served_model, &r.model)?;
    let prompts = r.prompt.into_vec();
    let stops = r.stop.map(OneOrMany::into_vec).unwrap_or_default();
    let max_tokens = r
        .max_tokens
        .unwrap_or(DEFAULT_MAX_TOKENS.min(limits.max_tokens));
    let temperature = r.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    if prompts.is_empty() || prompts.len() > limits.max_items {
        return Err(ApiError::invalid(format!(
            "\"prompt\" needs 1 to {} prompts, got {}",
            limits.max_items,
            prompts.len()
        )));
    }
    if r.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    if max_tokens == 0 || max_tokens > limits.max_tokens {
        return Err(ApiError::invalid(format!(
            "\"max_tokens\" must be 1 to {} (the server's limit), got {max_tokens}",
            limits.max_tokens
        )));
    }
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(format!(
            "\"temperature\" must be 0 to 2, got {temperature}"
        )));
    }
    if stops.len() > MAX_STOPS || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(format!(
            "\"stop\" takes 1 to {MAX_STOPS} non-empty strings"
        )));
    }
    if r.stream && prompts.len() > 1 {
        return Err(ApiError::invalid(
            "\"stream\" answers one prompt per request",
        ));
    }
    Ok(CheckedCompletion {
        prompts,
        stops,
        max_tokens,
        temperature,
        seed: r.seed,
        stream: r.stream,
        min_generation: r.min_generation,
    })
}

/// Waits (bounded by the request timeout) until `min_generation` is served.
async fn wait_for(s: &Shared, min_generation: Option<u64>) -> ApiResult<()> {
    if let Some(min) = min_generation {
        if !s.wait_for_generation(min, s.limits.request_timeout).await {
            return Err(ApiError::unavailable(format!(
                "generation {min} was not served within {} s (serving {})",
                s.limits.request_timeout.as_secs(),
                s.served().generation
            ))
            .code("generation_not_served"));
        }
    }
    Ok(())
}

fn submit(s: &Shared, job: Job) -> ApiResult<()> {
    if s.submit(job) {
        Ok(())
    } else {
        Err(ApiError::busy("the query queue is full; retry later"))
    }
}

async fn answer_of<T>(s: &Shared, answer: oneshot::Receiver<Result<T, String>>) -> ApiResult<T> {
    match tokio::time::timeout(s.limits.request_timeout, answer).await {
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no answer within {} s (--request-timeout-s)",
                s.limits.request_timeout.as_secs()
            ),
        )),
        Ok(Err(_)) => Err(ApiError::internal("the query worker stopped")),
        Ok(Ok(Err(e))) => Err(ApiError::internal(e)),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

/// Turns a completion's tokens into its text and finish reason.
struct Finisher {
    base: Arc<BaseModel>,
    eos: Option<u32>,
    stops: Vec<String>,
}

impl Finisher {
    /// The text (cut before the first stop string), `"stop"` or `"length"`, and the tokens used.
    fn text(&self, tokens: &[u32]) -> (String, &'static str, usize) {
        let hit_eos = self.eos.is_some() && tokens.last().copied() == self.eos;
        let kept = if hit_eos {
            &tokens[..tokens.len() - 1]
        } else {
            tokens
        };
        let text = self.base.tokenizer.decode(kept).unwrap_or_default();
        if let Some(at) = self.first_stop(&text) {
            return (text[..at].to_string(), "stop", tokens.len());
        }
        // Neither eos nor a stop string: the token limit (or the model's context) ended it.
        let reason = if hit_eos { "stop" } else { "length" };
        (text, reason, tokens.len())
    }

    fn first_stop(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// How much of `text` can be sent while more tokens may follow: not a trailing partial
    /// character, and not a tail that may begin a stop string.
    fn safe_len(&self, text: &str) -> usize {
        let mut end = text.len();
        if text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        for stop in &self.stops {
            for k in (1..stop.len()).rev() {
                if stop.is_char_boundary(k) && text[..end].ends_with(&stop[..k]) {
                    end -= k;
                    break;
                }
            }
        }
        end
    }
}

/// A streamed completion: server-sent events with each new piece of text, then the finish
/// reason and the `elder` fields, then `data: [DONE]`.
fn stream(
    s: Arc<Shared>,
    id: String,
    finish: Finisher,
    mut tokens: tokio::sync::mpsc::UnboundedReceiver<u32>,
    answer: oneshot::Receiver<Result<Completion, String>>,
) -> Sse<tokio_stream::wrappers::ReceiverStream<Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let created = unix_now();
    let model = s.model_name.clone();
    tokio::spawn(async move {
        let chunk = |text: &str, reason: Option<&str>, elder: Option<Value>| {
            let mut choice =
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason});
            if let Some(e) = elder {
                choice["elder"] = e;
            }
            Event::default().data(
                json!({"id": id, "object": "text_completion", "created": created,
                       "model": model, "choices": [choice]})
                .to_string(),
            )
        };
        let mut kept: Vec<u32> = Vec::new();
        let mut sent = 0;
        let mut stopped = false;
        while let Some(t) = tokens.recv().await {
            if Some(t) == finish.eos {
                continue;
            }
            kept.push(t);
            let text = finish.base.tokenizer.decode(&kept).unwrap_or_default();
            let end = match finish.first_stop(&text) {
                Some(at) => {
                    stopped = true;
                    at
                }
                None => finish.safe_len(&text),
            };
            if end > sent && text.is_char_boundary(end) && text.is_char_boundary(sent) {
                if tx
                    .send(Ok(chunk(&text[sent..end], None, None)))
                    .await
                    .is_err()
                {
                    return; // the client left
                }
                sent = end;
            }
            if stopped {
                break;
            }
        }
        drop(tokens);
        let last = match answer_of(&s, answer).await {
            Ok(c) => {
                let (text, reason, _) = finish.text(&c.tokens);
                count_answer(c.in_scope);
                let rest = if sent <= text.len() && text.is_char_boundary(sent) {
                    &text[sent..]
                } else {
                    ""
                };
                chunk(
                    rest,
                    Some(reason),
                    Some(json!({"generation": c.generation, "in_scope": c.in_scope})),
                )
            }
            Err(e) => Event::default().data(
                json!({"error": {"message": e.message, "type": e.kind(), "code": e.code}})
                    .to_string(),
            ),
        };
        let _ = tx.send(Ok(last)).await;
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[derive(Deserialize)]
struct ScoreRequest {
    model: Option<String>,
    prompt: String,
    target: String,
    min_generation: Option<u64>,
}

async fn score(
    State(s): State<AppState>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let r: ScoreRequest = json_of(&bytes_of(bytes)?)?;
    check_model(&s.model_name, &r.model)?;
    let base = base(&s)?;
    let encode = |text: &str, what: &str, continuation: bool| {
        let ids = if continuation {
            base.tokenizer.encode_continuation(text)
        } else {
            base.tokenizer.encode(text)
        };
        let ids = ids.map_err(|e| ApiError::invalid(format!("{what}: {e:#}")))?;
        if ids.is_empty() {
            return Err(ApiError::invalid(format!("the {what} has no tokens")));
        }
        Ok(ids)
    };
    let prompt = encode(&r.prompt, "prompt", false)?;
    let target = encode(&r.target, "target", true)?;
    base.cfg
        .check_context(&[("the prompt", prompt.len()), ("the target", target.len())])
        .map_err(|e| ApiError::bad_request(format!("{e:#}")).code("context_length_exceeded"))?;
    wait_for(&s, r.min_generation).await?;
    let (reply, answer) = oneshot::channel();
    submit(
        &s,
        Job::Score {
            prompt: prompt.clone(),
            target: target.clone(),
            reply,
        },
    )?;
    let scored: ScoreResult = answer_of(&s, answer).await?;
    count_answer(scored.in_scope);
    let pieces: Vec<String> = target
        .iter()
        .map(|&id| base.tokenizer.decode(&[id]).unwrap_or_default())
        .collect();
    Ok(Json(json!({
        "prompt": r.prompt, "target": r.target,
        "prompt_tokens": prompt, "target_tokens": target, "target_pieces": pieces,
        "logprobs": scored.logprobs, "argmax": scored.argmax,
        "total_logprob": scored.logprobs.iter().sum::<f32>(),
        "in_scope": scored.in_scope, "generation": scored.generation, "model": s.model_name,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn the_api_document_is_json_and_names_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for route in [
            "/health",
            "/ready",
            "/metrics",
            "/openapi.json",
            "/v1/models",
            "/v1/edits",
            "/v1/edits/{id}",
            "/v1/completions",
            "/v1/score",
        ] {
            assert!(
                paths.contains_key(route),
                "{route} missing from openapi.json"
            );
        }
        assert!(doc["paths"]["/v1/edits/{id}"]["delete"].is_object());
    }
}
