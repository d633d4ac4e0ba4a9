//! Installing the CNI plugin on a node (DESIGN.md §4 "Install"): copy `interceptor-cni`
//! into the CNI bin dir, chain it into the node's primary network config, keep it there
//! when another tool rewrites that file, and take both out again on uninstall.
//!
//! The primary config is the one kubelet's runtimes use (libcni's `ConfFiles` + sort):
//! the lexicographically first `*.conflist`, `*.conf` or `*.json` in the conf dir. A
//! `.conflist` gets our plugin object appended to `plugins`; a single-plugin `.conf` or
//! `.json` is wrapped into `<stem>.conflist`, and the original is removed once the new
//! file is in place.
//!
//! Files are edited as text: every byte outside our entry stays as it was (key order,
//! number spelling, whitespace), and the result is checked to parse and to hold the same
//! other plugins before it is written. Every write goes to a temp file in the same
//! directory, is fsynced, takes the old file's mode and owner, and is renamed over the
//! target, so a runtime reading the directory sees the old file or the new one, never a
//! half-written one. A file that is not JSON is an error naming it, and is never touched.
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use interceptor_cni::config::SUPPORTED_VERSIONS;
use interceptor_cni::FailurePolicy;
use serde_json::{Map, Value};
use tokio::task::JoinHandle;

pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_AGENT_SOCKET: &str = interceptor_cni::config::DEFAULT_AGENT_SOCKET;
/// The plugin's `type` in the chain, which is also its file name in the bin dir.
pub const PLUGIN_TYPE: &str = "interceptor-cni";
/// How often the agent checks that the primary config still chains the plugin.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Extensions libcni (and so containerd and CRI-O) loads network configs from.
const CONFIG_EXTENSIONS: &[&str] = &["conflist", "conf", "json"];
/// `sun_path` is 108 bytes including the terminating NUL on Linux.
const MAX_SOCKET_PATH_BYTES: usize = 107;
/// The keys of our entry that the installer owns; any other key an operator added to the
/// entry is kept on update.
const OWN_KEYS: &[&str] = &["type", "agentSocket", "failurePolicy"];

/// What `interceptor install-cni` (or `agent --install-cni`) installs, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallConfig {
    /// CNI bin dir (`CNI_PATH` of the runtime), default [`DEFAULT_CNI_BIN_DIR`].
    pub bin_dir: PathBuf,
    /// CNI conf dir, default [`DEFAULT_CNI_CONF_DIR`].
    pub conf_dir: PathBuf,
    /// The `interceptor-cni` executable to copy (see [`default_plugin_binary`]).
    pub plugin_binary: PathBuf,
    /// `agentSocket` of our entry: the agent's CNI socket.
    pub agent_socket: PathBuf,
    /// `failurePolicy` of our entry.
    pub failure_policy: FailurePolicy,
}

impl InstallConfig {
    /// Where the plugin is copied to: `<bin dir>/interceptor-cni`.
    pub fn installed_binary(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }
}

/// `interceptor-cni` next to the running executable (both are built and shipped
/// together).
pub fn default_plugin_binary() -> io::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name(PLUGIN_TYPE))
}

/// `fail-closed` or `fail-open`, the values of `failurePolicy` (for the CLI).
pub fn parse_failure_policy(s: &str) -> Result<FailurePolicy, String> {
    match s {
        "fail-closed" => Ok(FailurePolicy::FailClosed),
        "fail-open" => Ok(FailurePolicy::FailOpen),
        other => Err(format!(
            "{other:?} is not a failure policy (fail-closed or fail-open)"
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    // The cause is part of the message (one line in logs and on the CLI), not a
    // separate `source`, so that `{:#}` does not print it twice.
    #[error("{}: {action}: {error}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
    #[error("CNI config {} is not valid JSON, left untouched: {error}", path.display())]
    NotJson {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("CNI config {}, left untouched: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "no CNI network config (*.conflist, *.conf or *.json) in {}: the node's network \
         plugin has not written one yet",
        dir.display()
    )]
    NoConfig { dir: PathBuf },
    #[error("cannot wrap {} into {}: {reason}", from.display(), to.display())]
    WrapTarget {
        from: PathBuf,
        to: PathBuf,
        reason: String,
    },
    #[error("CNI config {} changed while it was being updated; not overwritten", path.display())]
    Changed { path: PathBuf },
    #[error("{what} {}: {reason}", path.display())]
    Setting {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl InstallError {
    fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> InstallError + 'a {
        move |error| InstallError::Io {
            path: path.to_path_buf(),
            action,
            error,
        }
    }

    fn invalid(path: &Path, reason: impl Into<String>) -> InstallError {
        InstallError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// Worth retrying without anything changing: I/O trouble or a concurrent writer. A
    /// config that is wrong stays wrong until someone rewrites it.
    pub fn is_transient(&self) -> bool {
        matches!(self, InstallError::Io { .. } | InstallError::Changed { .. })
    }
}

/// What happened to the primary config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigChange {
    /// Our entry was appended to this conflist.
    Added(PathBuf),
    /// Our entry was there with other values (or twice) and was updated in place.
    Updated(PathBuf),
    /// Our entry was there already as configured; the file was not written.
    Unchanged(PathBuf),
    /// A single-plugin config was wrapped into a conflist ending with our entry.
    Wrapped { from: PathBuf, to: PathBuf },
}

impl ConfigChange {
    /// The conflist that now chains the plugin.
    pub fn conflist(&self) -> &Path {
        match self {
            Self::Added(p) | Self::Updated(p) | Self::Unchanged(p) => p,
            Self::Wrapped { to, .. } => to,
        }
    }
}

impl fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Added(p) => write!(f, "added {PLUGIN_TYPE} to {}", p.display()),
            Self::Updated(p) => write!(f, "updated the {PLUGIN_TYPE} entry in {}", p.display()),
            Self::Unchanged(p) => write!(
                f,
                "{} already chains {PLUGIN_TYPE} as configured",
                p.display()
            ),
            Self::Wrapped { from, to } => write!(
                f,
                "wrapped {} into {} with {PLUGIN_TYPE} appended, and removed {}",
                from.display(),
                to.display(),
                from.display()
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallReport {
    pub binary: PathBuf,
    pub config: ConfigChange,
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "installed {}", self.binary.display())?;
        write!(f, "{}", self.config)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UninstallReport {
    /// Conflists our entry was removed from.
    pub removed_from: Vec<PathBuf>,
    pub removed_binary: Option<PathBuf>,
    /// Conflists that could not be read as conflists, left untouched, and why.
    pub skipped: Vec<(PathBuf, String)>,
}

impl UninstallReport {
    pub fn nothing_installed(&self) -> bool {
        self.removed_from.is_empty() && self.removed_binary.is_none()
    }
}

impl fmt::Display for UninstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = Vec::new();
        for p in &self.removed_from {
            lines.push(format!("removed {PLUGIN_TYPE} from {}", p.display()));
        }
        if let Some(p) = &self.removed_binary {
            lines.push(format!("removed {}", p.display()));
        }
        if self.nothing_installed() {
            lines.push(format!("{PLUGIN_TYPE} was not installed: nothing to do"));
        }
        for (p, why) in &self.skipped {
            lines.push(format!("left {} untouched: {why}", p.display()));
        }
        write!(f, "{}", lines.join("\n"))
    }
}

/// Copies the plugin into the bin dir, then chains it into the primary config. When the
/// config step fails, a binary this call put there (none before) is removed again.
pub fn install(cfg: &InstallConfig) -> Result<InstallReport, InstallError> {
    validate(cfg)?;
    let had_binary = cfg.installed_binary().symlink_metadata().is_ok();
    let binary = copy_binary(&cfg.plugin_binary, &cfg.bin_dir)?;
    match ensure_config(cfg) {
        Ok(config) => Ok(InstallReport { binary, config }),
        Err(e) => {
            if !had_binary {
                let _ = fs::remove_file(&binary);
            }
            Err(e)
        }
    }
}

/// For the agent: installs, tolerating a conf dir the node's network plugin has not
/// filled yet (logged; the watch adds the entry when a config appears), then keeps the
/// entry in place every `interval` (see [`keep_installed`]). Stop with [`stop`].
pub fn start(cfg: &InstallConfig, interval: Duration) -> Result<JoinHandle<()>, InstallError> {
    match install(cfg) {
        Ok(report) => tracing::info!(%report, "CNI plugin installed"),
        Err(InstallError::NoConfig { dir }) => {
            copy_binary(&cfg.plugin_binary, &cfg.bin_dir)?;
            tracing::warn!(conf_dir = %dir.display(),
                "no CNI network config yet; {PLUGIN_TYPE} is chained in when one appears");
        }
        Err(e) => return Err(e),
    }
    Ok(keep_installed(cfg.clone(), interval))
}

/// Stops the watch of [`start`], waiting for it so that no write of its races what
/// follows, then uninstalls when `uninstall` (an agent stopping for good; one handing
/// over to its successor leaves the plugin chained, so new pods keep failing closed
/// rather than starting unintercepted). Logs what it did.
pub async fn stop(
    watch: JoinHandle<()>,
    cfg: &InstallConfig,
    uninstall: bool,
) -> Result<UninstallReport, InstallError> {
    watch.abort();
    let _ = watch.await;
    if !uninstall {
        tracing::info!("leaving the CNI plugin installed");
        return Ok(UninstallReport::default());
    }
    let report = self::uninstall(&cfg.bin_dir, &cfg.conf_dir)?;
    tracing::info!(%report, "CNI plugin uninstalled");
    Ok(report)
}

fn validate(cfg: &InstallConfig) -> Result<(), InstallError> {
    let bad = |reason: &str| InstallError::Setting {
        what: "agent socket",
        path: cfg.agent_socket.clone(),
        reason: reason.to_owned(),
    };
    let Some(socket) = cfg.agent_socket.to_str() else {
        return Err(bad("is not UTF-8, so it cannot go into a JSON config"));
    };
    if !cfg.agent_socket.is_absolute() {
        return Err(bad(
            "is not absolute (the runtime runs the plugin from any directory)",
        ));
    }
    if socket.len() > MAX_SOCKET_PATH_BYTES {
        return Err(bad(&format!(
            "is longer than {MAX_SOCKET_PATH_BYTES} bytes, the limit for a unix socket path"
        )));
    }
    Ok(())
}

/// Makes sure the primary config chains our entry as configured (without touching the
/// binary): what the watch re-applies.
pub fn ensure_config(cfg: &InstallConfig) -> Result<ConfigChange, InstallError> {
    validate(cfg)?;
    let path = primary_config(&cfg.conf_dir)?.ok_or_else(|| InstallError::NoConfig {
        dir: cfg.conf_dir.clone(),
    })?;
    let original = fs::read(&path).map_err(InstallError::io(&path, "reading"))?;
    let (text, value) = parse_config(&path, &original)?;
    let entry = Entry::from_config(cfg);
    if is_conflist(&path) {
        let Some((new_text, change)) = conflist_with_entry(&path, &text, &value, &entry)? else {
            return Ok(ConfigChange::Unchanged(path));
        };
        let meta = fs::metadata(&path).map_err(InstallError::io(&path, "reading metadata"))?;
        // Replace the file a symlink points at, not the symlink.
        let target = fs::canonicalize(&path).map_err(InstallError::io(&path, "resolving"))?;
        write_atomic(&target, new_text.as_bytes(), &meta, || {
            unchanged(&path, &original)
        })?;
        Ok(match change {
            Edit::Added => ConfigChange::Added(path),
            Edit::Updated => ConfigChange::Updated(path),
        })
    } else {
        let new_text = wrapped(&path, &text, &value, &entry)?;
        let to = path.with_extension("conflist");
        check_wrap_target(&path, &to, &value)?;
        let meta = fs::metadata(&path).map_err(InstallError::io(&path, "reading metadata"))?;
        write_atomic(&to, new_text.as_bytes(), &meta, || Ok(()))?;
        // The new conflist is in place; the runtime would still pick the original (it
        // sorts first), so it goes, unless it changed meanwhile: then the next attempt
        // wraps the new content over our conflist.
        unchanged(&path, &original)?;
        fs::remove_file(&path).map_err(InstallError::io(&path, "removing the wrapped original"))?;
        sync_dir(&cfg.conf_dir)?;
        Ok(ConfigChange::Wrapped { from: path, to })
    }
}

/// Removes our entry from every conflist in `conf_dir` that has one, then the binary.
/// Nothing installed is not an error (see [`UninstallReport::nothing_installed`]).
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<UninstallReport, InstallError> {
    let mut report = UninstallReport::default();
    for path in config_files(conf_dir)? {
        if !is_conflist(&path) {
            continue;
        }
        let original = fs::read(&path).map_err(InstallError::io(&path, "reading"))?;
        let (text, value) = match parse_config(&path, &original) {
            Ok(parsed) => parsed,
            Err(e) => {
                report.skipped.push((path, e.to_string()));
                continue;
            }
        };
        let Some(new_text) = conflist_without_entry(&path, &text, &value)? else {
            continue;
        };
        let meta = fs::metadata(&path).map_err(InstallError::io(&path, "reading metadata"))?;
        let target = fs::canonicalize(&path).map_err(InstallError::io(&path, "resolving"))?;
        write_atomic(&target, new_text.as_bytes(), &meta, || {
            unchanged(&path, &original)
        })?;
        report.removed_from.push(path);
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => {
            sync_dir(bin_dir)?;
            report.removed_binary = Some(binary);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(InstallError::io(&binary, "removing")(e)),
    }
    Ok(report)
}

/// Re-applies [`ensure_config`] whenever the primary config (which file it is, its size,
/// mtime or contents) differs from the last state seen with our entry in place, checking
/// every `interval`. Errors are logged once per distinct message; a config that is wrong
/// is retried when it changes, I/O trouble on the next tick.
pub fn keep_installed(cfg: InstallConfig, interval: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut good: Option<Snapshot> = None;
        let mut last_error: Option<String> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            // Taken before the check, so a write racing the check shows up next tick as
            // a different snapshot instead of being taken for the state we checked.
            let before = Snapshot::take(&cfg.conf_dir).ok();
            if before.is_some() && before == good {
                continue;
            }
            // Synchronous on purpose: a few small reads and at most one rename, and an
            // abort (agent shutdown) can then never leave a write running behind it.
            match ensure_config(&cfg) {
                Ok(ConfigChange::Unchanged(_)) => {
                    good = before;
                    last_error = None;
                }
                Ok(change) => {
                    tracing::info!(%change, "CNI config re-applied");
                    // Confirmed by the next tick's check of what is there now.
                    good = None;
                    last_error = None;
                }
                Err(error) => {
                    let message = error.to_string();
                    if last_error.as_deref() != Some(message.as_str()) {
                        tracing::warn!(error = %message, "keeping the CNI plugin installed");
                        last_error = Some(message);
                    }
                    good = if error.is_transient() { None } else { before };
                }
            }
        }
    })
}

/// What the watch compares between ticks.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    primary: Option<PathBuf>,
    len: u64,
    mtime: Option<SystemTime>,
    contents: Vec<u8>,
}

impl Snapshot {
    fn take(conf_dir: &Path) -> Result<Snapshot, InstallError> {
        let Some(primary) = primary_config(conf_dir)? else {
            return Ok(Snapshot {
                primary: None,
                len: 0,
                mtime: None,
                contents: Vec::new(),
            });
        };
        let meta =
            fs::metadata(&primary).map_err(InstallError::io(&primary, "reading metadata"))?;
        let contents = fs::read(&primary).map_err(InstallError::io(&primary, "reading"))?;
        Ok(Snapshot {
            primary: Some(primary),
            len: meta.len(),
            mtime: meta.modified().ok(),
            contents,
        })
    }
}

/// Regular files (or links to them) in `dir` with a config extension, sorted by name as
/// libcni sorts them. A missing directory has none.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(InstallError::io(dir, "listing")(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(InstallError::io(dir, "listing"))?;
        let path = entry.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e));
        if wanted && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The config the runtime uses: the first of [`config_files`].
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    Ok(config_files(conf_dir)?.into_iter().next())
}

fn is_conflist(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "conflist")
}

fn parse_config(path: &Path, bytes: &[u8]) -> Result<(String, Value), InstallError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|error| InstallError::NotJson {
        path: path.to_path_buf(),
        error,
    })?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| InstallError::invalid(path, "is not UTF-8"))?;
    Ok((text, value))
}

/// Fails with [`InstallError::Changed`] when `path` no longer holds `original`.
fn unchanged(path: &Path, original: &[u8]) -> Result<(), InstallError> {
    match fs::read(path) {
        Ok(now) if now == original => Ok(()),
        Ok(_) => Err(InstallError::Changed {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(InstallError::Changed {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(InstallError::io(path, "re-reading")(e)),
    }
}

fn check_version(path: &Path, value: &Value) -> Result<(), InstallError> {
    let version = match value.get("cniVersion") {
        Some(Value::String(v)) => v,
        Some(_) => return Err(InstallError::invalid(path, "cniVersion is not a string")),
        None => {
            return Err(InstallError::invalid(
                path,
                format!("has no cniVersion, which {PLUGIN_TYPE} needs"),
            ))
        }
    };
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(InstallError::invalid(
            path,
            format!(
                "cniVersion {version:?} is not supported by {PLUGIN_TYPE} (supported: {}); \
                 chaining it would fail every pod",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Our plugin object as configured.
struct Entry {
    agent_socket: String,
    failure_policy: &'static str,
}

impl Entry {
    fn from_config(cfg: &InstallConfig) -> Entry {
        Entry {
            // validate() made sure it is UTF-8.
            agent_socket: cfg.agent_socket.to_string_lossy().into_owned(),
            failure_policy: cfg.failure_policy.as_str(),
        }
    }

    fn is_current(&self, existing: &Value) -> bool {
        existing.get("agentSocket").and_then(Value::as_str) == Some(self.agent_socket.as_str())
            && existing.get("failurePolicy").and_then(Value::as_str) == Some(self.failure_policy)
    }

    /// `{"type": ..., "agentSocket": ..., "failurePolicy": ...}` followed by any other keys
    /// of `existing` (e.g. a `timeoutMs` an operator set).
    fn text(&self, existing: Option<&Map<String, Value>>) -> String {
        let quote = |s: &str| Value::String(s.to_owned()).to_string();
        let mut text = format!(
            "{{\"type\": {}, \"agentSocket\": {}, \"failurePolicy\": {}",
            quote(PLUGIN_TYPE),
            quote(&self.agent_socket),
            quote(self.failure_policy)
        );
        for (key, value) in existing.into_iter().flatten() {
            if !OWN_KEYS.contains(&key.as_str()) {
                text.push_str(&format!(", {}: {value}", quote(key)));
            }
        }
        text.push('}');
        text
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

enum Edit {
    Added,
    Updated,
}

/// The `plugins` array of a conflist's text: its span and its elements' spans and values.
struct Plugins {
    elements: Vec<(std::ops::Range<usize>, Value)>,
}

impl Plugins {
    fn scan(path: &Path, text: &str) -> Result<Plugins, InstallError> {
        let root = json_text::root(text);
        let array = json_text::members(text, root)
            .into_iter()
            .rfind(|m| m.key == "plugins")
            .ok_or_else(|| InstallError::invalid(path, "has no \"plugins\" array"))?
            .value;
        let mut elements = Vec::new();
        for span in json_text::elements(text, array) {
            let value = serde_json::from_str(&text[span.clone()]).map_err(|e| {
                InstallError::invalid(path, format!("cannot read a plugin entry: {e}"))
            })?;
            elements.push((span, value));
        }
        Ok(Plugins { elements })
    }

    fn spans(&self) -> Vec<std::ops::Range<usize>> {
        self.elements.iter().map(|(s, _)| s.clone()).collect()
    }

    fn ours(&self) -> Vec<usize> {
        (0..self.elements.len())
            .filter(|&i| is_ours(&self.elements[i].1))
            .collect()
    }
}

/// Checks the shape of a conflist: an object with a non-empty `plugins` array and a
/// cniVersion the plugin speaks.
fn check_conflist(path: &Path, value: &Value) -> Result<(), InstallError> {
    let Some(object) = value.as_object() else {
        return Err(InstallError::invalid(path, "is not a JSON object"));
    };
    match object.get("plugins") {
        Some(Value::Array(plugins)) if plugins.is_empty() => {
            return Err(InstallError::invalid(path, "has an empty \"plugins\" list"))
        }
        Some(Value::Array(_)) => {}
        _ => return Err(InstallError::invalid(path, "has no \"plugins\" array")),
    }
    check_version(path, value)
}

/// The conflist text with our entry appended (or updated in place, duplicates removed),
/// or `None` when it is already there as configured.
fn conflist_with_entry(
    path: &Path,
    text: &str,
    value: &Value,
    entry: &Entry,
) -> Result<Option<(String, Edit)>, InstallError> {
    check_conflist(path, value)?;
    let mut text = text.to_owned();
    let mut plugins = Plugins::scan(path, &text)?;
    let ours = plugins.ours();
    let edit = match ours.first() {
        None => {
            let (last, _) = plugins.elements.last().expect("checked non-empty");
            // The new entry on its own line, indented like the last one, unless the
            // array is written on one line.
            let line_start = text[..last.start].rfind('\n').map_or(0, |i| i + 1);
            let indent = &text[line_start..last.start];
            let insertion = if line_start > 0 && indent.bytes().all(|b| b == b' ' || b == b'\t') {
                format!(",\n{indent}{}", entry.text(None))
            } else {
                format!(", {}", entry.text(None))
            };
            text.insert_str(last.end, &insertion);
            Edit::Added
        }
        Some(&first) => {
            if ours.len() == 1 && entry.is_current(&plugins.elements[first].1) {
                return Ok(None);
            }
            // Later duplicates go (one at a time: removing one moves the others).
            while let Some(&dup) = plugins.ours().get(1) {
                text = json_text::remove_item(&text, &plugins.spans(), dup);
                plugins = Plugins::scan(path, &text)?;
            }
            let (span, existing) = &plugins.elements[first];
            let replacement = entry.text(existing.as_object());
            text.replace_range(span.clone(), &replacement);
            Edit::Updated
        }
    };
    verify_edit(path, value, &text, true)?;
    Ok(Some((text, edit)))
}

/// The conflist text without our entries, or `None` when it has none (or is not a
/// conflist at all: not ours to judge on uninstall).
fn conflist_without_entry(
    path: &Path,
    text: &str,
    value: &Value,
) -> Result<Option<String>, InstallError> {
    let has_ours = value
        .get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|plugins| plugins.iter().any(is_ours));
    if !has_ours {
        return Ok(None);
    }
    let mut text = text.to_owned();
    loop {
        let plugins = Plugins::scan(path, &text)?;
        let Some(&i) = plugins.ours().first() else {
            break;
        };
        text = json_text::remove_item(&text, &plugins.spans(), i);
    }
    verify_edit(path, value, &text, false)?;
    Ok(Some(text))
}

/// Guards against a bug in the text editing: the new text parses, has the same top-level
/// fields, the same other plugins in the same order, and our entry exactly when wanted.
fn verify_edit(
    path: &Path,
    old: &Value,
    new_text: &str,
    want_ours: bool,
) -> Result<(), InstallError> {
    let bug = |what: &str| {
        InstallError::invalid(
            path,
            format!("internal error: the edited config would {what}; not written"),
        )
    };
    let new: Value = serde_json::from_str(new_text).map_err(|_| bug("not be valid JSON"))?;
    let strip = |v: &Value| -> (Vec<Value>, Map<String, Value>, usize) {
        let mut object = v.as_object().cloned().unwrap_or_default();
        let plugins = match object.remove("plugins") {
            Some(Value::Array(p)) => p,
            _ => Vec::new(),
        };
        let ours = plugins.iter().filter(|p| is_ours(p)).count();
        let others = plugins.into_iter().filter(|p| !is_ours(p)).collect();
        (others, object, ours)
    };
    let (old_plugins, old_rest, _) = strip(old);
    let (new_plugins, new_rest, new_ours) = strip(&new);
    if old_plugins != new_plugins || old_rest != new_rest {
        return Err(bug("change more than the interceptor-cni entry"));
    }
    if new_ours != usize::from(want_ours) {
        return Err(bug("have the wrong number of interceptor-cni entries"));
    }
    Ok(())
}

/// The conflist a single-plugin config becomes: its `cniVersion` and `name`, then the
/// original object without those two (as written: key order, spelling), then ours.
fn wrapped(path: &Path, text: &str, value: &Value, entry: &Entry) -> Result<String, InstallError> {
    let Some(object) = value.as_object() else {
        return Err(InstallError::invalid(path, "is not a JSON object"));
    };
    if object.contains_key("plugins") && !object.contains_key("type") {
        return Err(InstallError::invalid(
            path,
            "has \"plugins\" but is not named *.conflist: runtimes read it as a single \
             plugin config, which it is not (rename it to .conflist)",
        ));
    }
    match object.get("type") {
        Some(Value::String(t)) if t == PLUGIN_TYPE => {
            return Err(InstallError::invalid(
                path,
                format!(
                    "is {PLUGIN_TYPE} alone; it must come after a plugin that sets up the network"
                ),
            ))
        }
        Some(Value::String(_)) => {}
        _ => return Err(InstallError::invalid(path, "has no plugin \"type\"")),
    }
    let Some(name) = object.get("name").and_then(Value::as_str) else {
        return Err(InstallError::invalid(path, "has no network \"name\""));
    };
    check_version(path, value)?;
    let version = object["cniVersion"].as_str().unwrap_or_default();

    let mut plugin = text[json_text::root(text)].to_owned();
    loop {
        let members = json_text::members(&plugin, 0..plugin.len());
        let Some(k) = members
            .iter()
            .position(|m| m.key == "cniVersion" || m.key == "name")
        else {
            break;
        };
        let spans: Vec<_> = members.iter().map(|m| m.span.clone()).collect();
        plugin = json_text::remove_item(&plugin, &spans, k);
    }
    // A newline in JSON text is always whitespace (never inside a string), so this only
    // re-indents the object into its place in the list.
    let plugin = plugin.replace('\n', "\n    ");
    let quote = |s: &str| Value::String(s.to_owned()).to_string();
    let new_text = format!(
        "{{\n  \"cniVersion\": {},\n  \"name\": {},\n  \"plugins\": [\n    {plugin},\n    {}\n  ]\n}}\n",
        quote(version),
        quote(name),
        entry.text(None)
    );
    // The same guard as for an edited conflist: the wrapped plugin is the original.
    let mut expected_plugin = object.clone();
    expected_plugin.remove("cniVersion");
    expected_plugin.remove("name");
    let expected = serde_json::json!({
        "cniVersion": version,
        "name": name,
        "plugins": [Value::Object(expected_plugin)],
    });
    verify_edit(path, &expected, &new_text, true)?;
    Ok(new_text)
}

/// Wrapping writes `<stem>.conflist`. If that file exists it is overwritten only when it
/// is an earlier wrap of ours (the original's plugin type, then ours: left by a run that
/// stopped before removing the original, or the original written again by its owner);
/// anything else there is somebody's config.
fn check_wrap_target(from: &Path, to: &Path, value: &Value) -> Result<(), InstallError> {
    let existing = match fs::read(to) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(InstallError::io(to, "reading")(e)),
    };
    let earlier_wrap = serde_json::from_slice::<Value>(&existing).is_ok_and(|v| {
        v["plugins"].as_array().is_some_and(|p| {
            p.len() == 2 && p[0].get("type") == value.get("type") && is_ours(&p[1])
        })
    });
    if earlier_wrap {
        Ok(())
    } else {
        Err(InstallError::WrapTarget {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            reason: format!(
                "{} exists and is not an earlier wrap of {} by {PLUGIN_TYPE}; both left untouched",
                to.display(),
                from.display()
            ),
        })
    }
}

/// Copies `src` to `<bin_dir>/interceptor-cni` (mode 0755) through a temp file and a
/// rename, which also works while the old binary is being executed.
fn copy_binary(src: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let setting = |reason: String| InstallError::Setting {
        what: "plugin binary",
        path: src.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(src).map_err(|e| setting(e.to_string()))?;
    if !meta.is_file() {
        return Err(setting("is not a regular file".into()));
    }
    let contents = fs::read(src).map_err(|e| setting(e.to_string()))?;
    fs::create_dir_all(bin_dir).map_err(InstallError::io(bin_dir, "creating"))?;
    let dest = bin_dir.join(PLUGIN_TYPE);
    write_file_atomic(&dest, &contents, 0o755, None, || Ok(()))?;
    Ok(dest)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temp file removed on drop unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    renamed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Hidden, and never ending in a config extension, so no runtime loads it.
fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(
        ".{name}.interceptor-tmp-{}-{n}",
        std::process::id()
    ))
}

/// [`write_file_atomic`] with the mode and owner of `like` (the file being replaced).
fn write_atomic(
    target: &Path,
    contents: &[u8],
    like: &fs::Metadata,
    still_valid: impl FnOnce() -> Result<(), InstallError>,
) -> Result<(), InstallError> {
    write_file_atomic(
        target,
        contents,
        like.permissions().mode() & 0o7777,
        Some((like.uid(), like.gid())),
        still_valid,
    )
}

/// Writes `contents` to a temp file next to `target`, sets `mode` (and `owner`), fsyncs
/// it, checks `still_valid`, renames it over `target` and fsyncs the directory. On any
/// failure the temp file is removed and `target` is as it was.
fn write_file_atomic(
    target: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    still_valid: impl FnOnce() -> Result<(), InstallError>,
) -> Result<(), InstallError> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = TempFile {
        path: temp_path(target),
        renamed: false,
    };
    let err = |action| InstallError::io(target, action);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp.path)
        .map_err(InstallError::io(&tmp.path, "creating a temp file"))?;
    file.write_all(contents)
        .map_err(InstallError::io(&tmp.path, "writing a temp file"))?;
    // fchmod: exact, whatever the umask.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err("setting the mode of the new file"))?;
    if let Some((uid, gid)) = owner {
        let mine = file
            .metadata()
            .map_err(err("reading the new file's metadata"))?;
        if (mine.uid(), mine.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(err("giving the new file the old one's owner"))?;
            // chown may clear set-id bits; put the mode back exactly.
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(err("setting the mode of the new file"))?;
        }
    }
    file.sync_all()
        .map_err(InstallError::io(&tmp.path, "syncing a temp file"))?;
    drop(file);
    still_valid()?;
    fs::rename(&tmp.path, target).map_err(err("renaming the new file into place"))?;
    tmp.renamed = true;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(InstallError::io(dir, "syncing the directory"))
}

/// Byte spans in JSON text that serde_json has already accepted, so that edits can leave
/// everything else exactly as written.
mod json_text {
    use std::ops::Range;

    pub(super) struct Member {
        pub key: String,
        /// From the key's opening quote to the end of the value.
        pub span: Range<usize>,
        pub value: Range<usize>,
    }

    fn skip_ws(b: &[u8], mut i: usize) -> usize {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        }
        i
    }

    /// `b[i]` is the opening quote; returns the index after the closing one. Bytes of
    /// multi-byte UTF-8 sequences are never `"` or `\`.
    fn string_end(b: &[u8], i: usize) -> usize {
        let mut j = i + 1;
        while j < b.len() {
            match b[j] {
                b'\\' => j += 2,
                b'"' => return j + 1,
                _ => j += 1,
            }
        }
        b.len()
    }

    /// The end of the value starting at `i`.
    fn value_end(b: &[u8], i: usize) -> usize {
        match b.get(i) {
            Some(b'"') => string_end(b, i),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                let mut j = i;
                while j < b.len() {
                    match b[j] {
                        b'"' => {
                            j = string_end(b, j);
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return j + 1;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                b.len()
            }
            _ => {
                let mut j = i;
                while j < b.len()
                    && !matches!(b[j], b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
                {
                    j += 1;
                }
                j
            }
        }
    }

    /// The top-level value.
    pub(super) fn root(text: &str) -> Range<usize> {
        let b = text.as_bytes();
        let start = skip_ws(b, 0);
        start..value_end(b, start)
    }

    /// The members of the object spanning `object`.
    pub(super) fn members(text: &str, object: Range<usize>) -> Vec<Member> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        if b.get(object.start) != Some(&b'{') {
            return out;
        }
        let mut i = skip_ws(b, object.start + 1);
        while i < object.end && b[i] == b'"' {
            let key_end = string_end(b, i);
            let key = serde_json::from_str(&text[i..key_end]).unwrap_or_default();
            let colon = skip_ws(b, key_end);
            let start = skip_ws(b, colon + 1);
            let end = value_end(b, start);
            out.push(Member {
                key,
                span: i..end,
                value: start..end,
            });
            i = skip_ws(b, end);
            if b.get(i) != Some(&b',') {
                break;
            }
            i = skip_ws(b, i + 1);
        }
        out
    }

    /// The elements of the array spanning `array`.
    pub(super) fn elements(text: &str, array: Range<usize>) -> Vec<Range<usize>> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        if b.get(array.start) != Some(&b'[') {
            return out;
        }
        let mut i = skip_ws(b, array.start + 1);
        while i < array.end && b[i] != b']' {
            let end = value_end(b, i);
            out.push(i..end);
            i = skip_ws(b, end);
            if b.get(i) != Some(&b',') {
                break;
            }
            i = skip_ws(b, i + 1);
        }
        out
    }

    /// `text` without item `k` of the container whose items (members or elements) span
    /// `items`, and without the comma that separated it from its neighbour.
    pub(super) fn remove_item(text: &str, items: &[Range<usize>], k: usize) -> String {
        let cut = if items.len() == 1 {
            items[0].clone()
        } else if k > 0 {
            items[k - 1].end..items[k].end
        } else {
            items[0].start..items[1].start
        };
        format!("{}{}", &text[..cut.start], &text[cut.end..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BRIDGE: &str = r#"{
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "mtu": 1.50e3,
      "weird": "a \"quoted\" ] } [ { string, with , commas",
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.0.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }"#;
    const PORTMAP: &str =
        r#"{"type": "portmap", "capabilities": {"portMappings": true}, "snat":true}"#;

    fn conflist_text() -> String {
        format!(
            "{{\n  \"name\": \"k8s-pod-network\",\n  \"cniVersion\": \"1.0.0\",\n  \"disableCheck\": false,\n  \"plugins\": [\n    {BRIDGE},\n    {PORTMAP}\n  ]\n}}\n"
        )
    }

    struct Env {
        _root: tempfile::TempDir,
        cfg: InstallConfig,
    }

    impl Env {
        fn new() -> Env {
            let root = tempfile::tempdir().unwrap();
            let bin_dir = root.path().join("bin");
            let conf_dir = root.path().join("net.d");
            fs::create_dir_all(&conf_dir).unwrap();
            let plugin_binary = root.path().join("build").join(PLUGIN_TYPE);
            fs::create_dir_all(plugin_binary.parent().unwrap()).unwrap();
            fs::write(&plugin_binary, b"#!/bin/sh\necho plugin\n").unwrap();
            Env {
                cfg: InstallConfig {
                    bin_dir,
                    conf_dir,
                    plugin_binary,
                    agent_socket: PathBuf::from("/var/run/interceptor/cni.sock"),
                    failure_policy: FailurePolicy::FailClosed,
                },
                _root: root,
            }
        }

        fn conf(&self, name: &str) -> PathBuf {
            self.cfg.conf_dir.join(name)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.conf(name);
            fs::write(&path, text).unwrap();
            path
        }

        fn read(&self, name: &str) -> String {
            fs::read_to_string(self.conf(name)).unwrap()
        }

        fn json(&self, name: &str) -> Value {
            serde_json::from_str(&self.read(name)).unwrap()
        }

        /// Every file in the conf and bin dirs (temp files included).
        fn listing(&self) -> Vec<String> {
            let mut names = Vec::new();
            for dir in [&self.cfg.conf_dir, &self.cfg.bin_dir] {
                if let Ok(rd) = fs::read_dir(dir) {
                    for e in rd {
                        names.push(e.unwrap().file_name().to_string_lossy().into_owned());
                    }
                }
            }
            names.sort();
            names
        }

        fn assert_no_temp_files(&self) {
            let temps: Vec<String> = self
                .listing()
                .into_iter()
                .filter(|n| n.contains("interceptor-tmp"))
                .collect();
            assert!(temps.is_empty(), "temp files left behind: {temps:?}");
        }
    }

    fn ours(value: &Value) -> Vec<Value> {
        value["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| is_ours(p))
            .cloned()
            .collect()
    }

    fn our_entry_line() -> String {
        r#"{"type": "interceptor-cni", "agentSocket": "/var/run/interceptor/cni.sock", "failurePolicy": "fail-closed"}"#.to_owned()
    }

    #[test]
    fn appends_to_a_conflist_leaving_everything_else_byte_for_byte() {
        let env = Env::new();
        let original = conflist_text();
        let path = env.write("10-calico.conflist", &original);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();

        let report = install(&env.cfg).unwrap();
        assert_eq!(report.config, ConfigChange::Added(path.clone()));
        assert_eq!(report.binary, env.cfg.bin_dir.join(PLUGIN_TYPE));

        let after = env.read("10-calico.conflist");
        // Exactly one insertion after the last plugin; every other byte as it was.
        let insertion = format!(",\n    {}", our_entry_line());
        assert_eq!(after.replacen(&insertion, "", 1), original);
        let pos = after.find(&insertion).unwrap();
        assert_eq!(&after[..pos], &original[..pos]);
        assert!(after[..pos].ends_with(PORTMAP));
        assert!(after.contains(BRIDGE));

        let value = env.json("10-calico.conflist");
        let plugins = value["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(
            plugins[2],
            json!({"type": "interceptor-cni", "agentSocket": "/var/run/interceptor/cni.sock",
                   "failurePolicy": "fail-closed"})
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640, "the file keeps its mode");
        let bin = fs::metadata(env.cfg.bin_dir.join(PLUGIN_TYPE)).unwrap();
        assert_eq!(bin.permissions().mode() & 0o7777, 0o755);
        assert_eq!(
            fs::read(env.cfg.bin_dir.join(PLUGIN_TYPE)).unwrap(),
            fs::read(&env.cfg.plugin_binary).unwrap()
        );
        env.assert_no_temp_files();
    }

    #[test]
    fn one_line_conflist_gets_the_entry_on_the_same_line() {
        let env = Env::new();
        let original = r#"{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"ptp"}]}"#;
        env.write("a.conflist", original);
        install(&env.cfg).unwrap();
        let after = env.read("a.conflist");
        assert_eq!(
            after,
            format!(
                r#"{{"cniVersion":"0.4.0","name":"n","plugins":[{{"type":"ptp"}}, {}]}}"#,
                our_entry_line()
            )
        );
    }

    #[test]
    fn reinstall_is_idempotent() {
        let env = Env::new();
        let path = env.write("10-net.conflist", &conflist_text());
        install(&env.cfg).unwrap();
        let once = env.read("10-net.conflist");
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));

        let report = install(&env.cfg).unwrap();
        assert_eq!(report.config, ConfigChange::Unchanged(path.clone()));
        assert_eq!(env.read("10-net.conflist"), once);
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_eq!(ours(&env.json("10-net.conflist")).len(), 1);
        env.assert_no_temp_files();
    }

    #[test]
    fn existing_entry_is_updated_in_place_and_duplicates_removed() {
        let env = Env::new();
        let text = format!(
            "{{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": [\n  {BRIDGE},\n  \
             {{\"type\": \"interceptor-cni\", \"agentSocket\": \"/old.sock\", \"timeoutMs\": 250}},\n  \
             {PORTMAP},\n  {{\"type\": \"interceptor-cni\"}}\n]}}"
        );
        let path = env.write("10-net.conflist", &text);
        let mut cfg = env.cfg.clone();
        cfg.failure_policy = FailurePolicy::FailOpen;

        assert_eq!(ensure_config(&cfg).unwrap(), ConfigChange::Updated(path));
        let value = env.json("10-net.conflist");
        let plugins = value["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3, "{value}");
        // Kept its place (before portmap) and the operator's timeoutMs.
        assert_eq!(
            plugins[1],
            json!({"type": "interceptor-cni", "agentSocket": "/var/run/interceptor/cni.sock",
                   "failurePolicy": "fail-open", "timeoutMs": 250})
        );
        assert_eq!(plugins[2]["type"], "portmap");
        let after = env.read("10-net.conflist");
        assert!(after.contains(BRIDGE) && after.contains(PORTMAP));
        assert!(after.ends_with(&format!("{PORTMAP}\n]}}")), "{after}");
    }

    #[test]
    fn wraps_a_single_plugin_conf() {
        let env = Env::new();
        let conf = r#"{
  "cniVersion": "0.3.1",
  "name": "mynet",
  "type": "bridge",
  "bridge": "cni0",
  "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}
}
"#;
        let path = env.write("10-mynet.conf", conf);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        // Not the primary: sorts after.
        let other = env.write("99-other.conflist", &conflist_text());

        let report = install(&env.cfg).unwrap();
        let to = env.conf("10-mynet.conflist");
        assert_eq!(
            report.config,
            ConfigChange::Wrapped {
                from: path.clone(),
                to: to.clone()
            }
        );
        assert!(
            !path.exists(),
            "the original goes once the conflist is in place"
        );
        assert_eq!(fs::read_to_string(&other).unwrap(), conflist_text());
        assert_eq!(
            fs::metadata(&to).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        let value = env.json("10-mynet.conflist");
        assert_eq!(
            value,
            json!({
                "cniVersion": "0.3.1",
                "name": "mynet",
                "plugins": [
                    {"type": "bridge", "bridge": "cni0",
                     "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}},
                    {"type": "interceptor-cni", "agentSocket": "/var/run/interceptor/cni.sock",
                     "failurePolicy": "fail-closed"}
                ]
            })
        );
        assert_eq!(primary_config(&env.cfg.conf_dir).unwrap(), Some(to.clone()));
        // Installing again finds the conflist and leaves it alone.
        assert_eq!(
            install(&env.cfg).unwrap().config,
            ConfigChange::Unchanged(to)
        );
        env.assert_no_temp_files();
    }

    #[test]
    fn wrapping_refuses_to_overwrite_someone_elses_conflist() {
        let env = Env::new();
        let conf = r#"{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}"#;
        env.write("10-n.conf", conf);
        // Sorts after 10-n.conf, so the .conf is primary; its wrap target is taken.
        env.write("10-n.conflist", &conflist_text());
        let err = install(&env.cfg).unwrap_err();
        assert!(matches!(err, InstallError::WrapTarget { .. }), "{err}");
        assert!(err.to_string().contains("10-n.conflist"), "{err}");
        assert_eq!(env.read("10-n.conf"), conf);
        assert_eq!(env.read("10-n.conflist"), conflist_text());
        // Failed before anything was chained: the binary this call copied is gone again.
        assert!(!env.cfg.bin_dir.join(PLUGIN_TYPE).exists());
        env.assert_no_temp_files();
    }

    #[test]
    fn rewritten_conf_is_wrapped_again_over_our_earlier_wrap() {
        let env = Env::new();
        env.write(
            "10-n.conf",
            r#"{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}"#,
        );
        install(&env.cfg).unwrap();
        // The network plugin's installer writes its .conf again, with a change.
        env.write(
            "10-n.conf",
            r#"{"cniVersion": "1.0.0", "name": "n", "type": "bridge", "mtu": 1400}"#,
        );
        let change = ensure_config(&env.cfg).unwrap();
        assert!(matches!(change, ConfigChange::Wrapped { .. }), "{change:?}");
        let value = env.json("10-n.conflist");
        assert_eq!(value["plugins"][0]["mtu"], 1400);
        assert_eq!(ours(&value).len(), 1);
        assert!(!env.conf("10-n.conf").exists());
    }

    #[test]
    fn primary_that_is_not_json_is_an_error_naming_it_and_left_untouched() {
        let env = Env::new();
        let garbage = "{\"cniVersion\": \"1.0.0\", \"plugins\": [ oops";
        let path = env.write("05-broken.conflist", garbage);
        env.write("10-good.conflist", &conflist_text());
        let err = install(&env.cfg).unwrap_err();
        assert!(matches!(err, InstallError::NotJson { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not valid JSON"), "{msg}");
        assert_eq!(env.read("05-broken.conflist"), garbage);
        assert_eq!(env.read("10-good.conflist"), conflist_text());
        assert!(!env.cfg.bin_dir.join(PLUGIN_TYPE).exists());
        env.assert_no_temp_files();

        // Same for a .conf that would be wrapped.
        fs::remove_file(&path).unwrap();
        fs::remove_file(env.conf("10-good.conflist")).unwrap();
        env.write("10-x.conf", "not json");
        let err = install(&env.cfg).unwrap_err();
        assert!(err.to_string().contains("10-x.conf"), "{err}");
        assert_eq!(env.read("10-x.conf"), "not json");
        assert!(!env.conf("10-x.conflist").exists());
    }

    #[test]
    fn configs_that_cannot_be_chained_are_precise_errors() {
        let cases = [
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                "no \"plugins\" array",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "empty",
            ),
            ("a.conflist", r#"[1, 2]"#, "not a JSON object"),
            (
                "a.conflist",
                r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"x"}]}"#,
                "0.2.0",
            ),
            (
                "a.conflist",
                r#"{"name":"n","plugins":[{"type":"x"}]}"#,
                "no cniVersion",
            ),
            (
                "a.conf",
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                "no plugin \"type\"",
            ),
            (
                "a.conf",
                r#"{"cniVersion":"1.0.0","type":"bridge"}"#,
                "no network \"name\"",
            ),
            (
                "a.json",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"x"}]}"#,
                "rename it",
            ),
        ];
        for (name, text, expect) in cases {
            let env = Env::new();
            env.write(name, text);
            let err = install(&env.cfg).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(expect) && msg.contains(name),
                "{name} {text}: {msg}"
            );
            assert_eq!(env.read(name), text);
            assert_eq!(env.listing(), vec![name.to_owned()], "{name} {text}");
        }
        let env = Env::new();
        assert!(matches!(
            install(&env.cfg).unwrap_err(),
            InstallError::NoConfig { .. }
        ));
    }

    #[test]
    fn primary_is_the_first_config_by_name() {
        let env = Env::new();
        env.write("20-b.conflist", &conflist_text());
        env.write("10-a.json", "{}");
        env.write("05-notes.txt", "x");
        fs::create_dir(env.conf("01-dir.conflist")).unwrap();
        assert_eq!(
            primary_config(&env.cfg.conf_dir).unwrap(),
            Some(env.conf("10-a.json"))
        );
        assert_eq!(primary_config(Path::new("/nonexistent/dir")).unwrap(), None);
    }

    #[test]
    fn bad_settings_are_errors_before_anything_is_written() {
        let env = Env::new();
        env.write("10-net.conflist", &conflist_text());
        let mut cfg = env.cfg.clone();
        cfg.agent_socket = PathBuf::from("relative.sock");
        assert!(install(&cfg)
            .unwrap_err()
            .to_string()
            .contains("not absolute"));
        cfg.agent_socket = PathBuf::from(format!("/{}", "s".repeat(120)));
        assert!(install(&cfg).unwrap_err().to_string().contains("107"));
        let mut cfg = env.cfg.clone();
        cfg.plugin_binary = PathBuf::from("/nonexistent/interceptor-cni");
        let msg = install(&cfg).unwrap_err().to_string();
        assert!(
            msg.contains("plugin binary /nonexistent/interceptor-cni"),
            "{msg}"
        );
        assert_eq!(env.read("10-net.conflist"), conflist_text());
        assert_eq!(env.listing(), vec!["10-net.conflist".to_owned()]);
    }

    #[test]
    fn uninstall_then_uninstall_again() {
        let env = Env::new();
        let original = conflist_text();
        let path = env.write("10-net.conflist", &original);
        install(&env.cfg).unwrap();

        let report = uninstall(&env.cfg.bin_dir, &env.cfg.conf_dir).unwrap();
        assert_eq!(report.removed_from, vec![path]);
        assert_eq!(
            report.removed_binary,
            Some(env.cfg.bin_dir.join(PLUGIN_TYPE))
        );
        assert_eq!(env.read("10-net.conflist"), original, "back byte for byte");
        assert!(!env.cfg.bin_dir.join(PLUGIN_TYPE).exists());

        let again = uninstall(&env.cfg.bin_dir, &env.cfg.conf_dir).unwrap();
        assert!(again.nothing_installed());
        assert!(again.to_string().contains("nothing to do"), "{again}");
        assert_eq!(env.read("10-net.conflist"), original);
        env.assert_no_temp_files();

        // Nothing there at all is fine too.
        let report = uninstall(
            Path::new("/nonexistent/bin"),
            Path::new("/nonexistent/conf"),
        );
        assert!(report.unwrap().nothing_installed());
    }

    #[test]
    fn uninstall_of_a_wrapped_conf_leaves_a_one_plugin_conflist() {
        let env = Env::new();
        env.write(
            "10-n.conf",
            r#"{"cniVersion": "1.0.0", "name": "n", "type": "bridge", "bridge": "b0"}"#,
        );
        install(&env.cfg).unwrap();
        uninstall(&env.cfg.bin_dir, &env.cfg.conf_dir).unwrap();
        assert_eq!(
            env.json("10-n.conflist"),
            json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge", "bridge": "b0"}]})
        );
    }

    #[test]
    fn uninstall_skips_files_that_are_not_json_and_cleans_the_rest() {
        let env = Env::new();
        env.write("10-net.conflist", &conflist_text());
        install(&env.cfg).unwrap();
        env.write("05-broken.conflist", "{{{");
        let report = uninstall(&env.cfg.bin_dir, &env.cfg.conf_dir).unwrap();
        assert_eq!(report.removed_from, vec![env.conf("10-net.conflist")]);
        assert_eq!(report.skipped.len(), 1);
        assert!(
            report.to_string().contains("05-broken.conflist"),
            "{report}"
        );
        assert_eq!(env.read("05-broken.conflist"), "{{{");
        assert_eq!(env.read("10-net.conflist"), conflist_text());
    }

    #[tokio::test]
    async fn watch_puts_the_entry_back_after_a_rewrite() {
        let env = Env::new();
        let original = conflist_text();
        env.write("10-net.conflist", &original);
        install(&env.cfg).unwrap();
        let watch = keep_installed(env.cfg.clone(), Duration::from_millis(20));

        // Another tool rewrites the file without our entry (a new inode, as tools do).
        let tmp = env.conf(".rewrite");
        fs::write(&tmp, &original).unwrap();
        fs::rename(&tmp, env.conf("10-net.conflist")).unwrap();
        wait_for(|| ours(&env.json("10-net.conflist")).len() == 1).await;

        // And in place, with a change of its own, which is kept.
        let changed = original.replace("\"disableCheck\": false", "\"disableCheck\": true");
        fs::write(env.conf("10-net.conflist"), &changed).unwrap();
        wait_for(|| {
            let v = env.json("10-net.conflist");
            ours(&v).len() == 1 && v["disableCheck"] == true
        })
        .await;

        // A broken rewrite is left alone, and fixed once it is valid again.
        fs::write(env.conf("10-net.conflist"), "{ broken").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(env.read("10-net.conflist"), "{ broken");
        fs::write(env.conf("10-net.conflist"), &original).unwrap();
        wait_for(|| ours(&env.json("10-net.conflist")).len() == 1).await;

        // A config that appears later (empty dir at first) is picked up too.
        let report = stop(watch, &env.cfg, true).await.unwrap();
        assert_eq!(report.removed_from.len(), 1);
        fs::remove_file(env.conf("10-net.conflist")).unwrap();
        let watch = start(&env.cfg, Duration::from_millis(20)).unwrap();
        assert!(env.cfg.bin_dir.join(PLUGIN_TYPE).exists());
        env.write(
            "10-late.conf",
            r#"{"cniVersion": "1.0.0", "name": "late", "type": "bridge"}"#,
        );
        wait_for(|| {
            env.conf("10-late.conflist").exists() && ours(&env.json("10-late.conflist")).len() == 1
        })
        .await;
        stop(watch, &env.cfg, true).await.unwrap();
        assert!(ours(&env.json("10-late.conflist")).is_empty());
        assert!(!env.cfg.bin_dir.join(PLUGIN_TYPE).exists());
        env.assert_no_temp_files();
    }

    async fn wait_for(mut cond: impl FnMut() -> bool) {
        for _ in 0..250 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("condition not met within 5 s");
    }

    #[test]
    fn failed_write_leaves_no_temp_file_and_the_target_untouched() {
        let env = Env::new();
        let target = env.write("10-net.conflist", &conflist_text());
        let meta = fs::metadata(&target).unwrap();
        // The check before the rename fails: the file was changed meanwhile.
        let err = write_atomic(&target, b"new", &meta, || {
            Err(InstallError::Changed {
                path: target.clone(),
            })
        })
        .unwrap_err();
        assert!(matches!(err, InstallError::Changed { .. }));
        assert_eq!(env.read("10-net.conflist"), conflist_text());
        env.assert_no_temp_files();
        // The rename itself fails: the target is a non-empty directory.
        let dir_target = env.conf("sub");
        fs::create_dir(&dir_target).unwrap();
        fs::write(dir_target.join("f"), "x").unwrap();
        assert!(write_file_atomic(&dir_target, b"new", 0o644, None, || Ok(())).is_err());
        env.assert_no_temp_files();
        // A concurrent change between read and rename is detected through `unchanged`.
        let original = fs::read(&target).unwrap();
        fs::write(&target, "{}").unwrap();
        assert!(matches!(
            unchanged(&target, &original),
            Err(InstallError::Changed { .. })
        ));
    }

    #[test]
    fn json_text_spans() {
        let text = r#" { "a" : [1, "x]\"}", {"b": [ ]}], "c":-1.5e3 , "d": null } "#;
        let root = json_text::root(text);
        assert_eq!(&text[root.clone()], text.trim());
        let members = json_text::members(text, root);
        let keys: Vec<&str> = members.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["a", "c", "d"]);
        assert_eq!(&text[members[1].value.clone()], "-1.5e3");
        let elements = json_text::elements(text, members[0].value.clone());
        let items: Vec<&str> = elements.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(items, ["1", r#""x]\"}""#, r#"{"b": [ ]}"#]);
        let spans: Vec<_> = members.iter().map(|m| m.span.clone()).collect();
        for k in 0..3 {
            let removed = json_text::remove_item(text, &spans, k);
            let v: Value = serde_json::from_str(&removed).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 2, "{removed}");
        }
        let one = r#"[ {"x": "é,]"} ]"#;
        let el = json_text::elements(one, json_text::root(one));
        assert_eq!(json_text::remove_item(one, &el, 0), "[  ]");
    }
}
