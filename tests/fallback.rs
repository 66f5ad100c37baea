//! Fallback channels end to end: the real engine, a fake WhatsApp Cloud API
//! (a local HTTP server in this file that checks path, bearer token and body
//! shape, and can fail, time out, answer 429 with Retry-After, or 400), and
//! a real SMTP server process (Python `aiosmtpd`, `tests/fallback_smtp.py`,
//! installed by `scripts/test.sh`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);
const WA_TOKEN: &str = "EAAG-test-access-token-42";

/// What the fake WhatsApp API answers: 200 with an id, or this status.
/// 0 = answer 200; 1 = never answer (time out); 429 = with Retry-After: 1.
struct FakeWhatsApp {
    port: u16,
    mode: Arc<AtomicU16>,
    got: Arc<Mutex<Vec<Value>>>,
    accepted: Arc<AtomicUsize>,
}

impl FakeWhatsApp {
    fn start() -> FakeWhatsApp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU16::new(0));
        let got = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (m, g, a) = (mode.clone(), got.clone(), accepted.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (m, g, a) = (m.clone(), g.clone(), a.clone());
                std::thread::spawn(move || serve(stream, &m, &g, &a));
            }
        });
        FakeWhatsApp { port, mode, got, accepted }
    }

    fn set(&self, mode: u16) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn requests(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }

    fn config(&self, extra: &str) -> String {
        format!(
            "[providers.whatsapp]\nkind = \"whatsapp_cloud\"\nbase_url = \"http://127.0.0.1:{}/v21.0\"\n\
             phone_number_id = \"1234567890\"\naccess_token = \"{WA_TOKEN}\"\ntimeout_ms = 500\n\
             retry_base_ms = 50\nretry_max_ms = 200\n{extra}\n",
            self.port
        )
    }
}

/// One HTTP/1.1 request per connection: checks the request shape, records
/// the body, answers per `mode`.
fn serve(stream: TcpStream, mode: &AtomicU16, got: &Mutex<Vec<Value>>, accepted: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let (mut length, mut auth, mut ctype) = (0usize, String::new(), String::new());
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        let (name, value) = h.split_once(':').unwrap_or((&h, ""));
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "authorization" => auth = value.trim().to_owned(),
            "content-type" => ctype = value.trim().to_owned(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let mut out = stream;
    assert_eq!(line.trim_end(), "POST /v21.0/1234567890/messages HTTP/1.1", "request line");
    if auth != format!("Bearer {WA_TOKEN}") || ctype != "application/json" {
        let _ = out.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        panic!("bad auth {auth:?} or content type {ctype:?}");
    }
    let v: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(v["messaging_product"], "whatsapp");
    assert_eq!(v["type"], "text");
    assert!(v["to"].as_str().is_some_and(|t| t.starts_with('+')), "{v}");
    assert!(v["text"]["body"].as_str().is_some(), "{v}");
    got.lock().unwrap().push(v);
    let answer = match mode.load(Ordering::SeqCst) {
        0 => {
            let n = accepted.fetch_add(1, Ordering::SeqCst) + 1;
            let b = format!(r#"{{"messaging_product":"whatsapp","messages":[{{"id":"wamid.TEST{n}"}}]}}"#);
            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len())
        }
        1 => {
            std::thread::sleep(Duration::from_secs(3));
            return;
        }
        429 => "HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n".to_owned(),
        s => format!("HTTP/1.1 {s} Nope\r\ncontent-length: 0\r\n\r\n"),
    };
    let _ = out.write_all(answer.as_bytes());
}

/// The real SMTP server (aiosmtpd), on a port of its own; killed on drop.
struct Smtp {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Smtp {
    fn start(dir: &Path) -> Smtp {
        let mut smtp = Smtp { port: free_port(), dir: dir.join("mail"), child: None };
        smtp.up();
        smtp
    }

    fn up(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fallback_smtp.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(self.port.to_string())
            .arg(&self.dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (scripts/test.sh installs it and aiosmtpd)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "aiosmtpd did not start (pip install aiosmtpd)");
        self.child = Some(child);
    }

    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn mails(&self) -> Vec<String> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "eml")).collect())
            .unwrap_or_default();
        names.sort();
        names.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect()
    }

    fn config(&self, extra: &str) -> String {
        format!(
            "[providers.email]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\nstarttls = false\n\
             from = \"Esh3ar <noreply@example.com>\"\ntimeout_ms = 2000\nretry_base_ms = 50\nretry_max_ms = 200\n{extra}\n",
            self.port
        )
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.down();
    }
}

fn setup(providers: &str) -> Setup {
    Setup::new(&Opts { extra_toml: providers.to_owned(), ..Opts::default() })
}

fn send(engine: &Engine, body: Value) -> String {
    let r = engine.client().request("POST", "/v1/messages", Some(API_KEY), Some(&body.to_string()));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

fn status_of(engine: &Engine, id: &str) -> Value {
    let r = engine.client().request("GET", &format!("/v1/messages/{id}"), Some(API_KEY), None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn admin(engine: &Engine, method: &str, path: &str, body: Option<&str>) -> Response {
    Client::connect(engine.admin).request(method, path, Some(ADMIN_TOKEN), body)
}

fn put_user(engine: &Engine, user: &str, phone: Option<&str>, email: Option<&str>) {
    let body = json!({"phone": phone, "email": email}).to_string();
    let r = admin(engine, "PUT", &format!("/v1/users/{user}"), Some(&body));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

fn wait_status(engine: &Engine, id: &str, status: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let s = status_of(engine, id);
        if s["status"] == status {
            return s;
        }
        assert!(Instant::now() < deadline, "still {s} after {within:?}, wanted {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn breaker(engine: &Engine, name: &str) -> String {
    let r = Client::connect(engine.admin).request("GET", "/healthz", None, None);
    r.json()["breakers"][name].as_str().unwrap_or("missing").to_owned()
}

#[test]
fn an_offline_user_gets_whatsapp_after_after_seconds_and_the_app_never_sees_it() {
    let wa = FakeWhatsApp::start();
    let setup = setup(&wa.config(""));
    let engine = setup.start();
    put_user(&engine, "ali", Some("+966500000001"), None);
    let id = send(&engine, json!({"to": "ali", "body": "your code is 4242", "fallback": {"after_seconds": 1}}));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status_of(&engine, &id)["status"], "accepted", "not before after_seconds");
    assert!(wa.requests().is_empty());
    let s = wait_status(&engine, &id, "delivered", WAIT);
    assert_eq!(s["channel"], "whatsapp", "{s}");
    assert_eq!(s["provider_message_id"], "wamid.TEST1", "{s}");
    let got = wa.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["to"], "+966500000001");
    assert_eq!(got[0]["text"]["body"], "your code is 4242");
    // Withdrawn from the app queue: a phone connecting now gets nothing.
    let mut phone = Phone::connect(engine.mobile, &token(&setup.config, "ali", 3600)).expect("connect");
    assert!(phone.recv(Duration::from_millis(700)).is_none(), "delivered elsewhere, not again on the app");
    assert_eq!(breaker(&engine, "provider:whatsapp"), "closed");
    // A message acked on the app before its time never goes to WhatsApp.
    let id2 = send(&engine, json!({"to": "ali", "body": "on the app", "fallback": {"after_seconds": 2}}));
    let frame = phone.recv(WAIT).expect("app delivery");
    phone.ack(frame["id"].as_str().unwrap());
    wait_status(&engine, &id2, "acked", WAIT);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(wa.requests().len(), 1, "an acked message must not fall back");
    assert_eq!(status_of(&engine, &id2)["channel"], "app");
}

#[test]
fn whatsapp_down_opens_its_breaker_and_email_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path());
    let wa = FakeWhatsApp::start();
    wa.set(500);
    let providers = format!("{}{}", wa.config("breaker_failures = 2\nbreaker_open_ms = 60000"), smtp.config(""));
    let setup = setup(&providers);
    let engine = setup.start();
    put_user(&engine, "sara", Some("+966500000002"), Some("sara@example.com"));
    let id = send(&engine, json!({"to": "sara", "body": "hello by mail", "fallback": {"after_seconds": 0}}));
    let s = wait_status(&engine, &id, "delivered", WAIT);
    assert_eq!(s["channel"], "email", "{s}");
    assert_eq!(breaker(&engine, "provider:whatsapp"), "open");
    assert_eq!(breaker(&engine, "provider:email"), "closed");
    assert_eq!(wa.requests().len(), 2, "two failures open the breaker, then the job yields to email");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(mails[0].contains("X-Rcpt-To: sara@example.com") && mails[0].contains("hello by mail"), "{}", mails[0]);
    // While the breaker is open, new messages go straight to email.
    let id2 = send(&engine, json!({"to": "sara", "body": "second", "fallback": {"after_seconds": 0}}));
    assert_eq!(wait_status(&engine, &id2, "delivered", WAIT)["channel"], "email");
    assert_eq!(wa.requests().len(), 2, "no request to an open breaker");
}

#[test]
fn a_provider_that_times_out_is_retried_and_delivers_when_it_answers_again() {
    let wa = FakeWhatsApp::start();
    wa.set(1); // hold every request for 3 s; the engine gives up after 500 ms
    let setup = setup(&wa.config("max_attempts = 1000\nbreaker_failures = 1000"));
    let engine = setup.start();
    put_user(&engine, "omar", Some("+966500000003"), None);
    let id = send(&engine, json!({"to": "omar", "body": "slow provider", "fallback": {"after_seconds": 0}}));
    let deadline = Instant::now() + WAIT;
    while wa.requests().len() < 2 {
        assert!(Instant::now() < deadline, "a timed-out call must be retried");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status_of(&engine, &id)["status"], "accepted", "a timeout is not a delivery");
    wa.set(0);
    let s = wait_status(&engine, &id, "delivered", WAIT);
    assert_eq!(s["channel"], "whatsapp", "{s}");
    assert!(s["provider_message_id"].as_str().is_some_and(|p| p.starts_with("wamid.TEST")), "{s}");
}

#[test]
fn permanent_errors_fail_the_message_into_the_dead_letter_queue_and_replay_delivers() {
    let wa = FakeWhatsApp::start();
    wa.set(400);
    let setup = setup(&wa.config("max_attempts = 5"));
    let engine = setup.start();
    put_user(&engine, "omar", Some("+966500000003"), None);
    let id =
        send(&engine, json!({"to": "omar", "body": "x", "fallback": {"after_seconds": 0, "channels": ["whatsapp"]}}));
    let s = wait_status(&engine, &id, "failed", WAIT);
    assert_eq!(s["reason"], "channels_exhausted", "{s}");
    assert_eq!(wa.requests().len(), 1, "a 400 is permanent: no retry");
    let list = admin(&engine, "GET", "/v1/dead-letters", None).json();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["kind"], "delivery");
    assert_eq!(items[0]["message_id"], id.as_str());
    assert!(items[0]["last_error"].as_str().unwrap().contains("400"), "{list}");
    // 429 with Retry-After is retried, not permanent; replay tries again.
    wa.set(429);
    let dl = items[0]["id"].as_str().unwrap().to_owned();
    let r = admin(&engine, "POST", &format!("/v1/dead-letters/{dl}/replay"), Some(""));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let deadline = Instant::now() + WAIT;
    while wa.requests().len() < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_429 = Instant::now();
    wa.set(0);
    let s = wait_status(&engine, &id, "delivered", WAIT);
    assert!(first_429.elapsed() >= Duration::from_millis(800), "Retry-After: 1 honoured");
    assert_eq!(s["channel"], "whatsapp");
    assert!(admin(&engine, "GET", "/v1/dead-letters", None).json()["items"].as_array().unwrap().is_empty());
}

#[test]
fn both_down_queues_survives_kill9_and_delivers_once_when_they_return() {
    let dir = tempfile::tempdir().unwrap();
    let mut smtp = Smtp::start(dir.path());
    smtp.down();
    let wa = FakeWhatsApp::start();
    wa.set(503);
    let policy = "breaker_failures = 1\nbreaker_open_ms = 300\nmax_attempts = 1000";
    let providers = format!("{}{}", wa.config(policy), smtp.config(policy));
    let setup = setup(&providers);
    let engine = setup.start();
    let mut ids = Vec::new();
    for i in 0..5 {
        let user = format!("u{i}");
        put_user(&engine, &user, Some(&format!("+96650000001{i}")), Some(&format!("{user}@example.com")));
        ids.push(send(&engine, json!({"to": user, "body": format!("m{i}"), "fallback": {"after_seconds": 0}})));
    }
    std::thread::sleep(Duration::from_millis(1500));
    for id in &ids {
        assert_eq!(status_of(&engine, id)["status"], "accepted", "queued while both are down");
    }
    engine.kill9();
    let engine = setup.start();
    std::thread::sleep(Duration::from_millis(500));
    for id in &ids {
        assert_eq!(status_of(&engine, id)["status"], "accepted", "still owed after kill -9");
    }
    smtp.up();
    wa.set(0);
    for id in &ids {
        let s = wait_status(&engine, id, "delivered", WAIT);
        assert!(s["channel"] == "whatsapp" || s["channel"] == "email", "{s}");
    }
    // Once each: successes of both providers add up to the messages.
    std::thread::sleep(Duration::from_millis(500));
    let total = wa.accepted.load(Ordering::SeqCst) + smtp.mails().len();
    assert_eq!(total, ids.len(), "each message delivered once");
    // And a restart sends nothing again.
    engine.kill9();
    let engine = setup.start();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(wa.accepted.load(Ordering::SeqCst) + smtp.mails().len(), ids.len());
    for id in &ids {
        assert_eq!(status_of(&engine, id)["status"], "delivered");
    }
}

#[test]
fn bad_fallback_inputs_get_400_naming_the_field() {
    let wa = FakeWhatsApp::start();
    let setup = setup(&wa.config(""));
    let engine = setup.start();
    let cases = [
        (json!({"to": "a", "body": "x", "fallback": {"after_seconds": 1, "channels": ["sms"]}}), "fallback.channels"),
        (json!({"to": "a", "body": "x", "fallback": {"after_seconds": 1, "channels": ["email"]}}), "fallback.channels"),
        (json!({"to": "a", "body": "x", "fallback": {"after_seconds": -1}}), "fallback.after_seconds"),
        (json!({"to": "a", "body": "x", "fallback": {"after_seconds": 99999999999u64}}), "fallback.after_seconds"),
        (json!({"to": "a", "body": "x", "fallback": {"channels": ["whatsapp"]}}), "fallback.after_seconds"),
        (json!({"to": "a", "body": "x", "fallback": {"after_seconds": 1, "when": 2}}), "fallback.when"),
        (json!({"to": "a", "body": "x", "fallback": 3}), "fallback"),
    ];
    for (body, field) in cases {
        let r = engine.client().request("POST", "/v1/messages", Some(API_KEY), Some(&body.to_string()));
        assert_eq!(r.status, 400, "{body}");
        let message = r.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(field), "{body}: {message}");
    }
    let batch =
        json!({"messages": [{"to": "a", "body": "x", "fallback": {"after_seconds": 1, "channels": ["pigeon"]}}]});
    let r = engine.client().request("POST", "/v1/messages/batch", Some(API_KEY), Some(&batch.to_string()));
    assert!(String::from_utf8_lossy(&r.body).contains("fallback.channels"), "{}", String::from_utf8_lossy(&r.body));
    // A phone not in E.164 form is refused by the directory.
    let r = admin(&engine, "PUT", "/v1/users/a", Some(r#"{"phone":"0500000000"}"#));
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("phone"));
}

#[test]
fn config_check_names_the_key_and_never_prints_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let wa = |extra: &str| {
        format!(
            "[providers.whatsapp]\nkind = \"whatsapp_cloud\"\nbase_url = \"https://graph.facebook.com/v21.0\"\n\
             phone_number_id = \"1234567890\"\naccess_token = \"{WA_TOKEN}\"\n{extra}"
        )
    };
    let email = |host: &str, starttls: bool| {
        format!(
            "[providers.email]\nkind = \"smtp\"\nhost = \"{host}\"\nstarttls = {starttls}\nusername = \"u\"\n\
             password = \"hunter2-secret\"\nfrom = \"Esh3ar <noreply@example.com>\"\n"
        )
    };
    let client = |extra: &str| {
        format!("[[clients]]\nid = \"fb\"\napi_key = \"fb-key-0123456789abcdef\"\ntier = \"basic\"\n{extra}\n")
    };
    let cases = [
        (wa("max_attempts = 0"), "providers.whatsapp.max_attempts"),
        (wa("kind2 = 1"), "kind2"),
        (email("smtp.example.com", false), "providers.email.starttls"),
        (
            format!("{}{}", wa(""), client("fallback_after_seconds = 5\nfallback_channels = [\"fax\"]")),
            "clients[2].fallback_channels",
        ),
        (
            format!("{}{}", wa(""), client("fallback_after_seconds = 5\nfallback_channels = [\"email\"]")),
            "clients[2].fallback_channels",
        ),
        (client("fallback_after_seconds = 5"), "clients[2].fallback_after_seconds"),
    ];
    for (extra, key) in cases {
        let config =
            write_config(dir.path(), &dir.path().join("data"), &Opts { extra_toml: extra.clone(), ..Opts::default() });
        let (code, out, err) = run_cli(&["config", "check", "--config", config.to_str().unwrap()]);
        let all = format!("{out}{err}");
        assert_ne!(code, 0, "{extra}");
        assert!(all.contains(key), "{key} not named: {all}");
        assert!(!all.contains(WA_TOKEN) && !all.contains("hunter2"), "a secret was printed: {all}");
    }
    let ok = format!("{}{}", wa(""), email("smtp.example.com", true));
    let config = write_config(dir.path(), &dir.path().join("data"), &Opts { extra_toml: ok, ..Opts::default() });
    let (code, out, err) = run_cli(&["config", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!format!("{out}{err}").contains(WA_TOKEN) && !format!("{out}{err}").contains("hunter2"));
}
