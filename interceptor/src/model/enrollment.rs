//! Whether a pod is enrolled in the mesh, from the FSM annotation and the Istio ambient label
//! on the pod and its namespace (DESIGN.md section 5).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Namespace, Pod};

/// FSM's per-namespace and per-pod switch: `enabled` or `disabled`.
pub const ANNOTATION_SIDECAR_INJECTION: &str = "flomesh.io/sidecar-injection";
/// Istio ambient's per-namespace and per-pod switch: `ambient` or `none`.
pub const LABEL_DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// The enrollment decision for one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Enrollment {
    pub enrolled: bool,
    /// Which object and key decided, e.g. `namespace demo label istio.io/dataplane-mode=ambient`,
    /// followed by any values that were ignored on the way.
    pub reason: String,
}

/// What one object (pod or namespace) says, if anything.
struct Word {
    enrolled: bool,
    reason: String,
}

pub(super) fn decide(pod: &Pod, namespace: Option<&Namespace>) -> Enrollment {
    let mut ignored = Vec::new();
    let pod_word = word(
        &format!("pod {}/{}", pod.namespace, pod.name),
        &pod.labels,
        &pod.annotations,
        &mut ignored,
    );
    let ns_word = namespace.and_then(|ns| {
        word(
            &format!("namespace {}", ns.name),
            &ns.labels,
            &ns.annotations,
            &mut ignored,
        )
    });
    let (enrolled, mut reason) = match pod_word.or(ns_word) {
        Some(w) => (w.enrolled, w.reason),
        None => (
            false,
            format!(
                "no {ANNOTATION_SIDECAR_INJECTION} annotation or {LABEL_DATAPLANE_MODE} label \
                 on pod {}/{} or namespace {}{}",
                pod.namespace,
                pod.name,
                pod.namespace,
                if namespace.is_none() {
                    " (namespace unknown)"
                } else {
                    ""
                }
            ),
        ),
    };
    for note in ignored {
        reason.push_str("; ");
        reason.push_str(&note);
    }
    Enrollment { enrolled, reason }
}

/// What an object's enrollment label or annotation says that is neither enrolling nor
/// excluding (`flomesh.io/sidecar-injection: maybe`), one note per entry naming the
/// object: the sources log these as warnings when they read the object, and enrollment
/// ignores the entry (the note is also in the pod's `reason`).
pub fn unrecognized(
    object: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut ignored = Vec::new();
    word(object, labels, annotations, &mut ignored);
    ignored
}

fn word(
    object: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    ignored: &mut Vec<String>,
) -> Option<Word> {
    let annotation = annotations.get(ANNOTATION_SIDECAR_INJECTION).and_then(|v| {
        let said = match v.as_str() {
            "enabled" => Some(true),
            "disabled" => Some(false),
            _ => None,
        };
        if said.is_none() {
            ignored.push(format!(
                "ignored {object} annotation {ANNOTATION_SIDECAR_INJECTION}={v:?} \
                 (expected enabled or disabled)"
            ));
        }
        said.map(|enrolled| Word {
            enrolled,
            reason: format!("{object} annotation {ANNOTATION_SIDECAR_INJECTION}={v}"),
        })
    });
    let label = labels.get(LABEL_DATAPLANE_MODE).and_then(|v| {
        let said = match v.as_str() {
            "ambient" => Some(true),
            "none" => Some(false),
            _ => None,
        };
        if said.is_none() {
            ignored.push(format!(
                "ignored {object} label {LABEL_DATAPLANE_MODE}={v:?} (expected ambient or none)"
            ));
        }
        said.map(|enrolled| Word {
            enrolled,
            reason: format!("{object} label {LABEL_DATAPLANE_MODE}={v}"),
        })
    });
    match (annotation, label) {
        (Some(a), Some(l)) if a.enrolled == l.enrolled => Some(Word {
            enrolled: a.enrolled,
            reason: format!(
                "{} and {}",
                a.reason,
                l.reason.trim_start_matches(object).trim()
            ),
        }),
        // One object saying both: opting out wins, so a pod someone excluded (often because
        // interception breaks it) stays excluded whichever convention they used.
        (Some(a), Some(l)) => {
            let (opt_out, opt_in) = if a.enrolled { (l, a) } else { (a, l) };
            Some(Word {
                enrolled: false,
                reason: format!(
                    "{} (wins over {} on the same object)",
                    opt_out.reason,
                    opt_in.reason.trim_start_matches(object).trim()
                ),
            })
        }
        (a, l) => a.or(l),
    }
}
