//! The CNI commands (ADD, DEL, CHECK, STATUS, GC, VERSION) of the chained plugin, run
//! against an injected environment, stdin, stdout and stderr.

use std::io::{Read, Write};

use serde_json::Value;

use crate::client::{AgentClient, ClientError};
use crate::config::{
    error_version_hint, parse_config, prev_result_ips, version_at_least, FailurePolicy, NetConf,
    PLUGIN_CNI_VERSION, SUPPORTED_VERSIONS,
};
use crate::env::{CniArgs, CniEnv};
use crate::error::CniError;
use crate::protocol::{codes, AgentRequest, AgentResponse, PodSandbox};

/// Exit status of a successful call.
pub const EXIT_OK: u8 = 0;
/// Exit status of a failed call; the spec asks for non-zero with the error on stdout.
pub const EXIT_ERROR: u8 = 1;

const LOG_PREFIX: &str = "interceptor-cni";

/// A `CNI_COMMAND` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(command: Option<&str>) -> Result<Self, CniError> {
        match command {
            Some("ADD") => Ok(Self::Add),
            Some("DEL") => Ok(Self::Del),
            Some("CHECK") => Ok(Self::Check),
            Some("STATUS") => Ok(Self::Status),
            Some("GC") => Ok(Self::Gc),
            Some("VERSION") => Ok(Self::Version),
            Some(other) => Err(CniError::invalid_environment(format!(
                "unknown CNI_COMMAND {other:?}"
            ))),
            None => Err(CniError::invalid_environment("CNI_COMMAND is not set")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }
}

/// The VERSION answer.
pub fn version_info() -> Value {
    serde_json::json!({
        "cniVersion": PLUGIN_CNI_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// Runs one plugin invocation of the real process: its environment, stdin, stdout and
/// stderr. Returns the exit status.
pub fn run_process() -> u8 {
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    match CniEnv::from_process_env() {
        Ok(env) => run(&env, &mut std::io::stdin().lock(), &mut stdout, &mut stderr),
        Err(err) => fail(&err, PLUGIN_CNI_VERSION, None, &mut stdout, &mut stderr),
    }
}

/// Runs one plugin invocation: results and CNI errors go to `stdout`, logs to `stderr`.
/// Returns the exit status ([`EXIT_OK`] or [`EXIT_ERROR`]).
pub fn run(
    env: &CniEnv,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8 {
    let command = match Command::parse(env.command.as_deref()) {
        Ok(command) => command,
        Err(err) => return fail(&err, PLUGIN_CNI_VERSION, None, stdout, stderr),
    };

    // VERSION needs nothing from stdin, and not reading it means a runtime that leaves
    // stdin open cannot hang us.
    if command == Command::Version {
        return emit(&version_info(), stdout, stderr);
    }

    let mut input = Vec::new();
    if let Err(e) = stdin.read_to_end(&mut input) {
        let err = CniError::new(codes::IO_FAILURE, format!("cannot read stdin: {e}"));
        return fail(&err, PLUGIN_CNI_VERSION, Some(command), stdout, stderr);
    }

    let mut log = Log(stderr);
    let outcome = parse_config(&input).and_then(|conf| execute(command, env, &conf, &mut log));
    let stderr = log.0;
    match outcome {
        Ok(Some(result)) => emit(&result, stdout, stderr),
        Ok(None) => EXIT_OK,
        Err(err) => fail(
            &err,
            &error_version_hint(&input),
            Some(command),
            stdout,
            stderr,
        ),
    }
}

/// Dispatches a command whose config has parsed; `Some` is what to print on stdout.
fn execute(
    command: Command,
    env: &CniEnv,
    conf: &NetConf,
    log: &mut Log<'_>,
) -> Result<Option<Value>, CniError> {
    match command {
        Command::Add => cmd_add(env, conf, log).map(Some),
        Command::Del => cmd_del(env, conf, log).map(|()| None),
        Command::Check => cmd_check(env, conf, log).map(|()| None),
        Command::Status => cmd_status(conf, log).map(|()| None),
        Command::Gc => {
            require_version(conf, "1.1.0", command)?;
            // Nothing to collect: the agent owns all per-pod state and reconciles it
            // against the pods it sees.
            Ok(None)
        }
        Command::Version => Ok(Some(version_info())),
    }
}

fn cmd_add(env: &CniEnv, conf: &NetConf, log: &mut Log<'_>) -> Result<Value, CniError> {
    let prev_result = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_network_config(
            "interceptor-cni must be chained after a plugin that produces prevResult",
        )
    })?;
    let container_id = require_env(&env.container_id, "CNI_CONTAINERID")?;
    let netns = require_env(&env.netns, "CNI_NETNS")?;
    let args = env.parsed_args()?;
    let (pod_namespace, pod_name) = require_pod(&args)?;
    let ips = prev_result_ips(prev_result)?;
    let result = with_cni_version(prev_result, &conf.cni_version);

    let pod = format!("{pod_namespace}/{pod_name}");
    let sandbox = PodSandbox {
        container_id: container_id.to_owned(),
        netns: netns.to_owned(),
        ifname: env.ifname.clone().unwrap_or_default(),
        pod_namespace: pod_namespace.to_owned(),
        pod_name: pod_name.to_owned(),
        ips,
    };
    match client(conf).call(&AgentRequest::Add(sandbox)) {
        Ok(AgentResponse::Ok { enrolled, detail }) => {
            let state = if enrolled { "enrolled" } else { "not enrolled" };
            log.line(&format!("ADD {pod}: {state}{}", suffix(&detail)));
            Ok(result)
        }
        Ok(AgentResponse::Error { code, msg, details }) => Err(CniError { code, msg, details }),
        Err(e) if e.is_unavailable() => match conf.failure_policy {
            FailurePolicy::FailClosed => Err(CniError::new(
                codes::TRY_AGAIN_LATER,
                unreachable_msg(conf, &e),
            )
            .with_details(format!(
                "failurePolicy is fail-closed: pod {pod} (container {container_id}) \
                 does not start until the agent enrolls it"
            ))),
            FailurePolicy::FailOpen => {
                log.warn(&format!(
                    "{}; failurePolicy is fail-open: pod {pod} (container {container_id}) \
                     starts WITHOUT interception",
                    unreachable_msg(conf, &e)
                ));
                Ok(result)
            }
        },
        Err(e) => Err(protocol_error(conf, &e)),
    }
}

/// DEL must converge: kubelet retries a failed DEL forever, and the agent reconciles
/// its state against the pods it sees anyway. So only an explicit refusal from the
/// agent fails it; anything missing or unreachable is a warning.
fn cmd_del(env: &CniEnv, conf: &NetConf, log: &mut Log<'_>) -> Result<(), CniError> {
    let container_id = require_env(&env.container_id, "CNI_CONTAINERID")?;
    let args = env.parsed_args()?;
    let (Some(pod_namespace), Some(pod_name)) = (args.pod_namespace(), args.pod_name()) else {
        log.line(&format!(
            "DEL container {container_id}: no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS, \
             nothing to tell the agent"
        ));
        return Ok(());
    };
    let ips = match conf.prev_result.as_ref().map(prev_result_ips) {
        None => Vec::new(),
        Some(Ok(ips)) => ips,
        Some(Err(err)) => {
            log.warn(&format!("DEL ignores an unusable prevResult: {}", err.msg));
            Vec::new()
        }
    };
    let sandbox = PodSandbox {
        container_id: container_id.to_owned(),
        netns: env.netns.clone().unwrap_or_default(),
        ifname: env.ifname.clone().unwrap_or_default(),
        pod_namespace: pod_namespace.to_owned(),
        pod_name: pod_name.to_owned(),
        ips,
    };
    match client(conf).call(&AgentRequest::Del(sandbox)) {
        Ok(AgentResponse::Ok { .. }) => Ok(()),
        Ok(AgentResponse::Error { code, msg, details }) => Err(CniError { code, msg, details }),
        Err(e) => {
            let why = if e.is_unavailable() {
                unreachable_msg(conf, &e)
            } else {
                protocol_error(conf, &e).msg
            };
            log.warn(&format!(
                "{why}; DEL of pod {pod_namespace}/{pod_name} (container {container_id}) \
                 succeeds anyway, the agent reconciles when it is back"
            ));
            Ok(())
        }
    }
}

fn cmd_check(env: &CniEnv, conf: &NetConf, log: &mut Log<'_>) -> Result<(), CniError> {
    require_version(conf, "0.4.0", Command::Check)?;
    let container_id = require_env(&env.container_id, "CNI_CONTAINERID")?;
    let args = env.parsed_args()?;
    let (pod_namespace, pod_name) = require_pod(&args)?;
    let ips = match &conf.prev_result {
        Some(prev) => prev_result_ips(prev)?,
        None => Vec::new(),
    };
    let pod = format!("{pod_namespace}/{pod_name}");
    let sandbox = PodSandbox {
        container_id: container_id.to_owned(),
        netns: env.netns.clone().unwrap_or_default(),
        ifname: env.ifname.clone().unwrap_or_default(),
        pod_namespace: pod_namespace.to_owned(),
        pod_name: pod_name.to_owned(),
        ips,
    };
    match client(conf).call(&AgentRequest::Check(sandbox)) {
        Ok(AgentResponse::Ok { .. }) => Ok(()),
        Ok(AgentResponse::Error { code, msg, details }) => Err(CniError { code, msg, details }),
        Err(e) if e.is_unavailable() => match conf.failure_policy {
            FailurePolicy::FailClosed => Err(CniError::new(
                codes::TRY_AGAIN_LATER,
                unreachable_msg(conf, &e),
            )),
            // Under fail-open a pod without the agent is an accepted state, so CHECK
            // must not have the runtime tear it down.
            FailurePolicy::FailOpen => {
                log.warn(&format!(
                    "{}; failurePolicy is fail-open: CHECK of pod {pod} passes unverified",
                    unreachable_msg(conf, &e)
                ));
                Ok(())
            }
        },
        Err(e) => Err(protocol_error(conf, &e)),
    }
}

fn cmd_status(conf: &NetConf, log: &mut Log<'_>) -> Result<(), CniError> {
    require_version(conf, "1.1.0", Command::Status)?;
    match client(conf).call(&AgentRequest::Status) {
        Ok(AgentResponse::Ok { .. }) => Ok(()),
        Ok(AgentResponse::Error { code, msg, details }) => Err(CniError { code, msg, details }),
        // Under fail-open, ADD succeeds without the agent, so reporting "not available"
        // would have the runtime hold back every pod: exactly what fail-open is meant
        // to avoid.
        Err(e) if e.is_unavailable() && conf.failure_policy == FailurePolicy::FailOpen => {
            log.warn(&format!(
                "{}; failurePolicy is fail-open: STATUS reports ready, pods start \
                 without interception",
                unreachable_msg(conf, &e)
            ));
            Ok(())
        }
        Err(e) => {
            let msg = if e.is_unavailable() {
                unreachable_msg(conf, &e)
            } else {
                protocol_error(conf, &e).msg
            };
            Err(CniError::new(codes::PLUGIN_NOT_AVAILABLE, msg))
        }
    }
}

fn client(conf: &NetConf) -> AgentClient {
    AgentClient::new(&conf.agent_socket, conf.timeout)
}

fn unreachable_msg(conf: &NetConf, e: &ClientError) -> String {
    format!(
        "interceptor agent unreachable at {}: {e}",
        conf.agent_socket.display()
    )
}

/// The agent answered, but not in the protocol: no failure policy applies.
fn protocol_error(conf: &NetConf, e: &ClientError) -> CniError {
    CniError::new(
        codes::IO_FAILURE,
        format!(
            "bad answer from the interceptor agent at {}: {e}",
            conf.agent_socket.display()
        ),
    )
    .with_details("the plugin and agent versions may not match")
}

fn require_env<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
    value
        .as_deref()
        .ok_or_else(|| CniError::invalid_environment(format!("{name} is not set")))
}

fn require_pod(args: &CniArgs) -> Result<(&str, &str), CniError> {
    match (args.pod_namespace(), args.pod_name()) {
        (Some(ns), Some(name)) => Ok((ns, name)),
        (ns, name) => {
            let missing: Vec<&str> = [
                ns.is_none().then_some("K8S_POD_NAMESPACE"),
                name.is_none().then_some("K8S_POD_NAME"),
            ]
            .into_iter()
            .flatten()
            .collect();
            Err(CniError::invalid_environment(format!(
                "CNI_ARGS lacks {}",
                missing.join(" and ")
            )))
        }
    }
}

fn require_version(conf: &NetConf, min: &str, command: Command) -> Result<(), CniError> {
    if version_at_least(&conf.cni_version, min) {
        Ok(())
    } else {
        Err(CniError::incompatible_version(format!(
            "config version {} does not allow {}; it needs {min} or later",
            conf.cni_version,
            command.as_str()
        )))
    }
}

/// `prevResult` as received, re-tagged with the config's version, as the spec requires
/// of a chained plugin's result.
fn with_cni_version(prev_result: &Value, cni_version: &str) -> Value {
    let mut result = prev_result.clone();
    if let Value::Object(map) = &mut result {
        map.insert("cniVersion".to_owned(), Value::from(cni_version));
    }
    result
}

fn suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

/// Prints `value` on stdout as the call's result.
fn emit(value: &Value, stdout: &mut dyn Write, stderr: &mut dyn Write) -> u8 {
    match write_json(value, stdout) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            Log(stderr).warn(&format!("cannot write result to stdout: {e}"));
            EXIT_ERROR
        }
    }
}

/// Prints the CNI error object on stdout, and the same text on stderr for logs that
/// do not keep stdout.
fn fail(
    err: &CniError,
    cni_version: &str,
    command: Option<Command>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8 {
    let mut log = Log(stderr);
    let what = command.map_or("call", Command::as_str);
    log.line(&format!(
        "{what} failed: code {}: {}{}",
        err.code,
        err.msg,
        suffix(&err.details)
    ));
    if let Err(e) = write_json(&err.to_json(cni_version), stdout) {
        log.warn(&format!("cannot write error to stdout: {e}"));
    }
    EXIT_ERROR
}

fn write_json(value: &Value, out: &mut dyn Write) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Log lines on stderr. A failing stderr cannot be reported anywhere, so write errors
/// are dropped.
struct Log<'a>(&'a mut dyn Write);

impl Log<'_> {
    fn line(&mut self, msg: &str) {
        let _ = writeln!(self.0, "{LOG_PREFIX}: {msg}");
    }

    fn warn(&mut self, msg: &str) {
        let _ = writeln!(self.0, "{LOG_PREFIX}: warning: {msg}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{temp_socket_path, FakeAgent, Reply};
    use serde_json::json;
    use std::collections::HashMap;
    use std::path::Path;

    struct Out {
        status: u8,
        stdout: String,
        stderr: String,
    }

    impl Out {
        fn json(&self) -> Value {
            serde_json::from_str(&self.stdout)
                .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {:?}", self.stdout))
        }

        /// Asserts a CNI error with `code` and returns its JSON.
        fn error(&self, code: u32) -> Value {
            assert_eq!(self.status, EXIT_ERROR, "stdout: {}", self.stdout);
            let err = self.json();
            assert_eq!(err["code"], code, "{err}");
            for key in ["cniVersion", "msg", "details"] {
                assert!(err.get(key).is_some(), "{key} missing from {err}");
            }
            err
        }

        fn silent_success(&self) {
            assert_eq!(self.status, EXIT_OK, "stdout: {}", self.stdout);
            assert_eq!(self.stdout, "");
        }
    }

    const POD_ARGS: &str =
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=client;K8S_POD_UID=u1";

    fn invoke(command: &str, extra: &[(&str, &str)], stdin: &str) -> Out {
        let mut vars: HashMap<String, String> = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "ctr1"),
            ("CNI_NETNS", "/var/run/netns/ctr1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", POD_ARGS),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (k, v) in extra {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        let env = CniEnv::from_lookup(|k| vars.get(k).cloned());
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = run(&env, &mut stdin.as_bytes(), &mut stdout, &mut stderr);
        Out {
            status,
            stdout: String::from_utf8(stdout).unwrap(),
            stderr: String::from_utf8(stderr).unwrap(),
        }
    }

    fn prev_result() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "0a:58:0a:00:00:05", "sandbox": "/var/run/netns/ctr1"}],
            "ips": [
                {"address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 0},
                {"address": "fd00::5/64", "interface": 0}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.96.0.10"]}
        })
    }

    /// A network config for `socket`, with `extra` fields merged over the defaults.
    fn config(socket: &Path, extra: Value) -> String {
        let mut conf = json!({
            "cniVersion": "1.1.0",
            "name": "k8s-pod-network",
            "type": "interceptor-cni",
            "agentSocket": socket,
            "timeoutMs": 2000,
            "runtimeConfig": {"portMappings": []},
        });
        if let (Value::Object(conf), Value::Object(extra)) = (&mut conf, extra) {
            conf.extend(extra);
        }
        conf.to_string()
    }

    fn with_prev(extra: Value) -> Value {
        let mut v = json!({"prevResult": prev_result()});
        if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
            v.extend(extra);
        }
        v
    }

    fn sandbox(netns: &str, ips: &[&str]) -> PodSandbox {
        PodSandbox {
            container_id: "ctr1".into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "client".into(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
        }
    }

    // ---- VERSION and generic input errors ----

    #[test]
    fn version_prints_supported_versions_without_reading_stdin() {
        struct Unreadable;
        impl Read for Unreadable {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                panic!("VERSION must not read stdin")
            }
        }
        let env = CniEnv::from_lookup(|k| (k == "CNI_COMMAND").then(|| "VERSION".to_owned()));
        let mut stdout = Vec::new();
        let status = run(&env, &mut Unreadable, &mut stdout, &mut Vec::new());
        assert_eq!(status, EXIT_OK);
        let out: Value = serde_json::from_slice(&stdout).unwrap();
        assert_eq!(
            out,
            json!({"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
        );
    }

    #[test]
    fn unknown_or_missing_command_is_code_4() {
        let out = invoke("FROB", &[], "{}");
        let err = out.error(codes::INVALID_ENVIRONMENT);
        assert!(err["msg"].as_str().unwrap().contains("FROB"));
        assert!(out.stderr.contains("FROB"), "{}", out.stderr);

        let env = CniEnv::default();
        let mut stdout = Vec::new();
        let status = run(&env, &mut &b""[..], &mut stdout, &mut Vec::new());
        assert_eq!(status, EXIT_ERROR);
        let err: Value = serde_json::from_slice(&stdout).unwrap();
        assert_eq!(err["code"], codes::INVALID_ENVIRONMENT);
        assert!(err["msg"].as_str().unwrap().contains("CNI_COMMAND"));
    }

    #[test]
    fn malformed_stdin_is_code_6_with_serde_text() {
        let out = invoke("ADD", &[], "{\"cniVersion\": \"1.1.0\", \"name\": ");
        let err = out.error(codes::DECODING_FAILURE);
        assert!(
            err["msg"].as_str().unwrap().contains("EOF while parsing"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_version_is_code_1() {
        let socket = temp_socket_path();
        let out = invoke("ADD", &[], &config(&socket, json!({"cniVersion": "2.0.0"})));
        let err = out.error(codes::INCOMPATIBLE_VERSION);
        assert_eq!(err["cniVersion"], "1.1.0");
    }

    #[test]
    fn error_carries_the_config_version() {
        let socket = temp_socket_path();
        let out = invoke("ADD", &[], &config(&socket, json!({"cniVersion": "0.4.0"})));
        let err = out.error(codes::INVALID_NETWORK_CONFIG);
        assert_eq!(err["cniVersion"], "0.4.0");
    }

    // ---- ADD ----

    #[test]
    fn add_prints_prev_result_after_agent_ok() {
        let agent = FakeAgent::start(vec![Reply::Respond(AgentResponse::Ok {
            enrolled: true,
            detail: "redirect installed".into(),
        })]);
        let out = invoke("ADD", &[], &config(agent.path(), with_prev(json!({}))));
        assert_eq!(out.status, EXIT_OK, "{}", out.stdout);
        let mut expected = prev_result();
        expected["cniVersion"] = json!("1.1.0");
        assert_eq!(out.json(), expected);
        assert!(out
            .stderr
            .contains("default/client: enrolled (redirect installed)"));
        assert_eq!(
            agent.finish(),
            vec![AgentRequest::Add(sandbox(
                "/var/run/netns/ctr1",
                &["10.0.0.5/24", "fd00::5/64"]
            ))]
        );
    }

    #[test]
    fn add_prints_prev_result_for_a_pod_the_agent_does_not_enroll() {
        let agent = FakeAgent::start(vec![Reply::ok(false)]);
        let out = invoke(
            "ADD",
            &[],
            &config(agent.path(), with_prev(json!({"cniVersion": "1.0.0"}))),
        );
        assert_eq!(out.status, EXIT_OK);
        assert_eq!(out.json(), prev_result());
        assert_eq!(agent.finish().len(), 1);
    }

    #[test]
    fn add_without_prev_result_is_code_7_and_asks_nothing() {
        let agent = FakeAgent::start(vec![]);
        let out = invoke("ADD", &[], &config(agent.path(), json!({})));
        let err = out.error(codes::INVALID_NETWORK_CONFIG);
        assert_eq!(
            err["msg"],
            "interceptor-cni must be chained after a plugin that produces prevResult"
        );
        assert!(agent.finish().is_empty());
    }

    #[test]
    fn add_without_netns_is_code_4() {
        let agent = FakeAgent::start(vec![]);
        let out = invoke(
            "ADD",
            &[("CNI_NETNS", "")],
            &config(agent.path(), with_prev(json!({}))),
        );
        let err = out.error(codes::INVALID_ENVIRONMENT);
        assert!(err["msg"].as_str().unwrap().contains("CNI_NETNS"), "{err}");
        assert!(agent.finish().is_empty());
    }

    #[test]
    fn add_without_container_id_is_code_4() {
        let agent = FakeAgent::start(vec![]);
        let out = invoke(
            "ADD",
            &[("CNI_CONTAINERID", "")],
            &config(agent.path(), with_prev(json!({}))),
        );
        let err = out.error(codes::INVALID_ENVIRONMENT);
        assert!(err["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
        assert!(agent.finish().is_empty());
    }

    #[test]
    fn add_without_pod_identity_is_code_4() {
        let agent = FakeAgent::start(vec![]);
        for (args, missing) in [
            ("IgnoreUnknown=1;K8S_POD_NAME=client", "K8S_POD_NAMESPACE"),
            ("K8S_POD_NAMESPACE=default", "K8S_POD_NAME"),
            ("", "K8S_POD_NAMESPACE and K8S_POD_NAME"),
        ] {
            let out = invoke(
                "ADD",
                &[("CNI_ARGS", args)],
                &config(agent.path(), with_prev(json!({}))),
            );
            let err = out.error(codes::INVALID_ENVIRONMENT);
            assert!(
                err["msg"].as_str().unwrap().ends_with(missing),
                "{args}: {err}"
            );
        }
        assert!(agent.finish().is_empty());
    }

    #[test]
    fn add_with_malformed_args_is_code_4_naming_the_pair() {
        let agent = FakeAgent::start(vec![]);
        let out = invoke(
            "ADD",
            &[(
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;oops;K8S_POD_NAME=client",
            )],
            &config(agent.path(), with_prev(json!({}))),
        );
        let err = out.error(codes::INVALID_ENVIRONMENT);
        assert!(err["msg"].as_str().unwrap().contains("\"oops\""), "{err}");
        assert!(agent.finish().is_empty());
    }

    #[test]
    fn add_relays_agent_error_and_prints_no_result() {
        let agent = FakeAgent::start(vec![Reply::error(
            codes::UNKNOWN_CONTAINER,
            "pod default/client not in model",
            "watch not synced",
        )]);
        let out = invoke("ADD", &[], &config(agent.path(), with_prev(json!({}))));
        let err = out.error(codes::UNKNOWN_CONTAINER);
        assert_eq!(err["msg"], "pod default/client not in model");
        assert_eq!(err["details"], "watch not synced");
        assert_eq!(err["cniVersion"], "1.1.0");
        assert!(err.get("ips").is_none());
        assert_eq!(agent.finish().len(), 1);
    }

    #[test]
    fn add_agent_error_fails_even_when_fail_open() {
        let agent = FakeAgent::start(vec![Reply::error(7, "bad pod", "")]);
        let out = invoke(
            "ADD",
            &[],
            &config(
                agent.path(),
                with_prev(json!({"failurePolicy": "fail-open"})),
            ),
        );
        out.error(7);
        agent.finish();
    }

    #[test]
    fn add_unreachable_fail_closed_is_code_11_naming_socket() {
        let socket = temp_socket_path();
        let out = invoke("ADD", &[], &config(&socket, with_prev(json!({}))));
        let err = out.error(codes::TRY_AGAIN_LATER);
        let msg = err["msg"].as_str().unwrap();
        assert!(msg.contains(socket.to_str().unwrap()), "{msg}");
        assert!(msg.contains("No such file or directory"), "{msg}");
        assert!(err["details"].as_str().unwrap().contains("fail-closed"));
    }

    #[test]
    fn add_unreachable_fail_open_starts_pod_with_warning() {
        let socket = temp_socket_path();
        let out = invoke(
            "ADD",
            &[],
            &config(&socket, with_prev(json!({"failurePolicy": "fail-open"}))),
        );
        assert_eq!(out.status, EXIT_OK, "{}", out.stdout);
        let mut expected = prev_result();
        expected["cniVersion"] = json!("1.1.0");
        assert_eq!(out.json(), expected);
        assert!(out.stderr.contains("warning"), "{}", out.stderr);
        assert!(out.stderr.contains(socket.to_str().unwrap()));
        assert!(out.stderr.contains("WITHOUT interception"));
    }

    #[test]
    fn add_timeout_follows_failure_policy() {
        let agent = FakeAgent::start(vec![Reply::Hang, Reply::Hang]);
        let out = invoke(
            "ADD",
            &[],
            &config(agent.path(), with_prev(json!({"timeoutMs": 100}))),
        );
        let err = out.error(codes::TRY_AGAIN_LATER);
        assert!(
            err["msg"]
                .as_str()
                .unwrap()
                .contains("no answer within 100 ms"),
            "{err}"
        );

        let out = invoke(
            "ADD",
            &[],
            &config(
                agent.path(),
                with_prev(json!({"timeoutMs": 100, "failurePolicy": "fail-open"})),
            ),
        );
        assert_eq!(out.status, EXIT_OK);
        assert_eq!(out.json()["ips"], prev_result()["ips"]);
        assert!(out.stderr.contains("no answer within 100 ms"));
        assert_eq!(agent.finish().len(), 2);
    }

    #[test]
    fn add_agent_closing_without_answer_is_unavailable() {
        let agent = FakeAgent::start(vec![Reply::Close]);
        let out = invoke("ADD", &[], &config(agent.path(), with_prev(json!({}))));
        out.error(codes::TRY_AGAIN_LATER);
        agent.finish();
    }

    #[test]
    fn add_garbled_answer_fails_regardless_of_policy() {
        let agent = FakeAgent::start(vec![Reply::Raw(b"{\"result\":\"maybe\"}\n".to_vec())]);
        let out = invoke(
            "ADD",
            &[],
            &config(
                agent.path(),
                with_prev(json!({"failurePolicy": "fail-open"})),
            ),
        );
        let err = out.error(codes::IO_FAILURE);
        assert!(err["msg"].as_str().unwrap().contains("bad answer"));
        agent.finish();
    }

    #[test]
    fn add_with_unusable_prev_result_ips_is_code_6() {
        let agent = FakeAgent::start(vec![]);
        let out = invoke(
            "ADD",
            &[],
            &config(
                agent.path(),
                json!({"prevResult": {"ips": [{"gateway": "10.0.0.1"}]}}),
            ),
        );
        out.error(codes::DECODING_FAILURE);
        assert!(agent.finish().is_empty());
    }

    // ---- DEL ----

    #[test]
    fn del_without_netns_or_prev_result_tells_agent_and_succeeds() {
        let agent = FakeAgent::start(vec![Reply::ok(false)]);
        let out = invoke(
            "DEL",
            &[("CNI_NETNS", "")],
            &config(agent.path(), json!({})),
        );
        out.silent_success();
        assert_eq!(agent.finish(), vec![AgentRequest::Del(sandbox("", &[]))]);
    }

    #[test]
    fn del_passes_prev_result_ips_when_present() {
        let agent = FakeAgent::start(vec![Reply::ok(true)]);
        let out = invoke("DEL", &[], &config(agent.path(), with_prev(json!({}))));
        out.silent_success();
        assert_eq!(
            agent.finish(),
            vec![AgentRequest::Del(sandbox(
                "/var/run/netns/ctr1",
                &["10.0.0.5/24", "fd00::5/64"]
            ))]
        );
    }

    #[test]
    fn del_with_agent_unreachable_succeeds_with_warning_under_both_policies() {
        let socket = temp_socket_path();
        for policy in ["fail-closed", "fail-open"] {
            let out = invoke(
                "DEL",
                &[],
                &config(&socket, json!({"failurePolicy": policy})),
            );
            out.silent_success();
            assert!(out.stderr.contains("warning"), "{}", out.stderr);
            assert!(out.stderr.contains(socket.to_str().unwrap()));
        }
    }

    #[test]
    fn del_with_garbled_answer_or_timeout_still_succeeds() {
        let agent = FakeAgent::start(vec![Reply::Raw(b"nonsense\n".to_vec()), Reply::Hang]);
        let out = invoke("DEL", &[], &config(agent.path(), json!({})));
        out.silent_success();
        assert!(out.stderr.contains("warning"));
        let out = invoke("DEL", &[], &config(agent.path(), json!({"timeoutMs": 50})));
        out.silent_success();
        assert!(out.stderr.contains("no answer within 50 ms"));
        assert_eq!(agent.finish().len(), 2);
    }

    #[test]
    fn del_without_pod_identity_succeeds_without_asking() {
        let agent = FakeAgent::start(vec![]);
        let out = invoke(
            "DEL",
            &[("CNI_ARGS", "IgnoreUnknown=1"), ("CNI_NETNS", "")],
            &config(agent.path(), json!({})),
        );
        out.silent_success();
        assert!(agent.finish().is_empty());
    }

    #[test]
    fn del_relays_an_explicit_agent_error() {
        let agent = FakeAgent::start(vec![Reply::error(codes::IO_FAILURE, "map busy", "")]);
        let out = invoke("DEL", &[], &config(agent.path(), json!({})));
        let err = out.error(codes::IO_FAILURE);
        assert_eq!(err["msg"], "map busy");
        agent.finish();
    }

    // ---- CHECK ----

    #[test]
    fn check_ok_is_silent() {
        let agent = FakeAgent::start(vec![Reply::ok(true)]);
        let out = invoke("CHECK", &[], &config(agent.path(), with_prev(json!({}))));
        out.silent_success();
        assert_eq!(
            agent.finish(),
            vec![AgentRequest::Check(sandbox(
                "/var/run/netns/ctr1",
                &["10.0.0.5/24", "fd00::5/64"]
            ))]
        );
    }

    #[test]
    fn check_relays_agent_error() {
        let agent = FakeAgent::start(vec![Reply::error(
            codes::UNKNOWN_CONTAINER,
            "redirect missing",
            "",
        )]);
        let out = invoke("CHECK", &[], &config(agent.path(), with_prev(json!({}))));
        let err = out.error(codes::UNKNOWN_CONTAINER);
        assert_eq!(err["msg"], "redirect missing");
        agent.finish();
    }

    #[test]
    fn check_unreachable_follows_failure_policy() {
        let socket = temp_socket_path();
        let out = invoke("CHECK", &[], &config(&socket, with_prev(json!({}))));
        out.error(codes::TRY_AGAIN_LATER);
        let out = invoke(
            "CHECK",
            &[],
            &config(&socket, with_prev(json!({"failurePolicy": "fail-open"}))),
        );
        out.silent_success();
        assert!(out.stderr.contains("warning"));
    }

    #[test]
    fn check_needs_pod_identity_and_a_recent_version() {
        let agent = FakeAgent::start(vec![]);
        let out = invoke(
            "CHECK",
            &[("CNI_ARGS", "")],
            &config(agent.path(), with_prev(json!({}))),
        );
        out.error(codes::INVALID_ENVIRONMENT);
        let out = invoke(
            "CHECK",
            &[],
            &config(agent.path(), with_prev(json!({"cniVersion": "0.3.1"}))),
        );
        let err = out.error(codes::INCOMPATIBLE_VERSION);
        assert_eq!(err["cniVersion"], "0.3.1");
        assert!(agent.finish().is_empty());
    }

    // ---- STATUS ----

    #[test]
    fn status_ok_is_silent() {
        let agent = FakeAgent::start(vec![Reply::ok(false)]);
        let env: &[(&str, &str)] = &[("CNI_CONTAINERID", ""), ("CNI_NETNS", ""), ("CNI_ARGS", "")];
        let out = invoke("STATUS", env, &config(agent.path(), json!({})));
        out.silent_success();
        assert_eq!(agent.finish(), vec![AgentRequest::Status]);
    }

    #[test]
    fn status_unreachable_is_code_50() {
        let socket = temp_socket_path();
        let out = invoke("STATUS", &[], &config(&socket, json!({})));
        let err = out.error(codes::PLUGIN_NOT_AVAILABLE);
        assert!(err["msg"]
            .as_str()
            .unwrap()
            .contains(socket.to_str().unwrap()));
    }

    #[test]
    fn status_unreachable_under_fail_open_reports_ready_with_warning() {
        let socket = temp_socket_path();
        let out = invoke(
            "STATUS",
            &[],
            &config(&socket, json!({"failurePolicy": "fail-open"})),
        );
        out.silent_success();
        assert!(out.stderr.contains("warning"));
    }

    #[test]
    fn status_garbled_answer_is_code_50() {
        let agent = FakeAgent::start(vec![Reply::Raw(b"?\n".to_vec())]);
        let out = invoke(
            "STATUS",
            &[],
            &config(agent.path(), json!({"failurePolicy": "fail-open"})),
        );
        out.error(codes::PLUGIN_NOT_AVAILABLE);
        agent.finish();
    }

    #[test]
    fn status_relays_agent_error() {
        let agent = FakeAgent::start(vec![Reply::error(
            codes::PLUGIN_NOT_AVAILABLE,
            "model not synced",
            "",
        )]);
        let out = invoke("STATUS", &[], &config(agent.path(), json!({})));
        let err = out.error(codes::PLUGIN_NOT_AVAILABLE);
        assert_eq!(err["msg"], "model not synced");
        agent.finish();
    }

    #[test]
    fn status_and_gc_need_version_1_1_0() {
        let agent = FakeAgent::start(vec![]);
        for command in ["STATUS", "GC"] {
            let out = invoke(
                command,
                &[],
                &config(agent.path(), json!({"cniVersion": "1.0.0"})),
            );
            let err = out.error(codes::INCOMPATIBLE_VERSION);
            assert!(err["msg"].as_str().unwrap().contains(command));
        }
        assert!(agent.finish().is_empty());
    }

    // ---- GC ----

    #[test]
    fn gc_succeeds_silently_without_asking() {
        let agent = FakeAgent::start(vec![]);
        let out = invoke(
            "GC",
            &[("CNI_CONTAINERID", ""), ("CNI_NETNS", ""), ("CNI_ARGS", "")],
            &config(
                agent.path(),
                json!({"cni.dev/valid-attachments": [{"containerID": "x", "ifname": "eth0"}]}),
            ),
        );
        out.silent_success();
        assert!(agent.finish().is_empty());
    }
}
