//! The manifest-directory source: builds the model from the Kubernetes YAML/JSON files in a
//! directory and reloads it when they change (the standalone default, DESIGN.md section 4).
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read, in name
//! order, skipping hidden files (which also skips the `..data` links of a mounted
//! ConfigMap). A file may hold several `---`-separated documents. `v1` Namespace, Pod and
//! Service objects, `discovery.k8s.io/v1` EndpointSlices, the L4 routing objects (Istio
//! VirtualService and DestinationRule, Gateway API TCPRoute, SMI TrafficSplit), and `v1`
//! List objects holding them (`kubectl get -o yaml`), go into the model; other kinds are
//! skipped. Errors name the file, line and column.
//!
//! Which objects are read and what they become is [`super::objects`], which the Kubernetes
//! source uses too; this module reads, parses and watches the files, and points the errors
//! of that conversion at their file, line and column.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, Visitor};
use serde::Deserialize;
use serde_yaml::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::objects::{
    self, Decode, ObjectError, ObjectKind, RoutingKind, Seg, Slice, SERVICE_NAME_LABEL,
};
use crate::config::MeshConfigObject;
use crate::model::routing::RoutingObject;
use crate::model::{Model, Namespace, Pod, Service};

/// Where in the manifests something is: a file and, when known, a 1-based line and column
/// (absolute in the file, whatever document they fall in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: Option<u32>,
    pub column: Option<u32>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        Ok(())
    }
}

/// Why the manifest directory could not be loaded. Displayed as `file:line:column: what`.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}: {source}", file.display())]
    ReadFile {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not YAML, or a field of the wrong type for its Kubernetes kind.
    #[error("{at}: {message}")]
    Parse { at: Location, message: String },
    /// A document that is not a Kubernetes object (no apiVersion or kind, not a mapping).
    #[error("{at}: {message}")]
    NotAnObject { at: Location, message: String },
    /// An object that does not convert, e.g. `clusterIP: banana`; `at` is the field's place.
    #[error("{at}: {error}")]
    InvalidValue {
        at: Location,
        // Boxed: the error is rare, and a large one would make every Result large.
        #[source]
        error: Box<ObjectError>,
    },
    #[error("{object} is defined twice: at {first} and at {second}")]
    Duplicate {
        object: String,
        first: Location,
        second: Location,
    },
}

impl ManifestError {
    /// The place the error points at; for a duplicate, the second definition.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ManifestError::ReadDir { .. } | ManifestError::ReadFile { .. } => None,
            ManifestError::Parse { at, .. }
            | ManifestError::NotAnObject { at, .. }
            | ManifestError::InvalidValue { at, .. } => Some(at),
            ManifestError::Duplicate { second, .. } => Some(second),
        }
    }
}

/// Loads the model from every manifest file in `dir` (see the module documentation).
pub fn load_dir(dir: &Path) -> Result<Model, ManifestError> {
    let mut loader = Loader::default();
    for file in manifest_files(dir)? {
        let text = fs::read_to_string(&file).map_err(|source| ManifestError::ReadFile {
            file: file.clone(),
            source,
        })?;
        loader.load_file(file, text)?;
    }
    Ok(loader.model)
}

/// Loads the model from the text of one manifest file; `file` only names it in errors.
pub fn load_str(file: &Path, text: &str) -> Result<Model, ManifestError> {
    let mut loader = Loader::default();
    loader.load_file(file.to_path_buf(), text.to_string())?;
    Ok(loader.model)
}

/// What [`watch_dir`] publishes.
///
/// `model` and `generation` change together, only when a load succeeds with a model
/// different from the previous one; consumers that program the data path should act on a
/// new `generation` only. `last_error` is the error of the latest load attempt (with
/// `file:line:column`) while the directory is broken, during which the previous model stays
/// in force, and is `None` again after the next successful load.
#[derive(Clone, Debug, Default)]
pub struct ManifestState {
    pub model: Arc<Model>,
    /// 0 before the first successful load, then bumped for each new model.
    pub generation: u64,
    pub last_error: Option<String>,
    /// FSM's MeshConfig object, from the Kubernetes source (`Unknown` from this one); it
    /// changes without `generation`, being no part of the model.
    pub mesh_config: MeshConfigObject,
}

/// Polls `dir` every `interval` (its file names, sizes and modification times) and reloads
/// it on change, publishing on `tx` as described at [`ManifestState`]. The first poll is
/// immediate. While the directory fails to load it is retried every poll, in case a file
/// was caught half-written, but each distinct error is logged once. The task runs until
/// its handle is aborted.
pub fn watch_dir(
    dir: PathBuf,
    interval: Duration,
    tx: watch::Sender<ManifestState>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen: Option<Fingerprint> = None;
        loop {
            ticker.tick().await;
            let failing = tx.borrow().last_error.is_some();
            let poll_dir = dir.clone();
            let last = seen.clone();
            // Directory reads and parsing block; keep them off the runtime's workers.
            let polled = tokio::task::spawn_blocking(move || {
                let fp = fingerprint(&poll_dir);
                if !failing && last.as_ref() == Some(&fp) {
                    return (fp, None);
                }
                let result = load_dir(&poll_dir);
                (fp, Some(result))
            })
            .await;
            let (fp, result) = match polled {
                Ok(polled) => polled,
                Err(err) => {
                    warn!(dir = %dir.display(), "manifest reload task failed: {err}");
                    continue;
                }
            };
            seen = Some(fp);
            match result {
                None => {}
                Some(Ok(model)) => publish_model(&dir, &tx, model),
                Some(Err(err)) => publish_error(&dir, &tx, &err),
            }
        }
    })
}

fn publish_model(dir: &Path, tx: &watch::Sender<ManifestState>, model: Model) {
    tx.send_if_modified(|state| {
        let recovered = state.last_error.take().is_some();
        if *state.model == model && state.generation > 0 {
            if recovered {
                info!(
                    dir = %dir.display(),
                    generation = state.generation,
                    "manifests load again, unchanged"
                );
            }
            return recovered;
        }
        state.generation += 1;
        info!(
            dir = %dir.display(),
            generation = state.generation,
            namespaces = model.namespaces.len(),
            pods = model.pods.len(),
            services = model.services.len(),
            "loaded manifests"
        );
        state.model = Arc::new(model);
        true
    });
}

fn publish_error(dir: &Path, tx: &watch::Sender<ManifestState>, err: &ManifestError) {
    let message = err.to_string();
    tx.send_if_modified(|state| {
        if state.last_error.as_deref() == Some(message.as_str()) {
            return false;
        }
        warn!(
            dir = %dir.display(),
            generation = state.generation,
            "cannot load manifests, keeping the previous model: {message}"
        );
        state.last_error = Some(message.clone());
        true
    });
}

/// What changes when a manifest file is edited, added, removed or replaced through a
/// symbolic link; a directory that cannot be read is its error text.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fingerprint {
    Files(Vec<(PathBuf, Option<SystemTime>, Option<u64>)>),
    Unreadable(String),
}

fn fingerprint(dir: &Path) -> Fingerprint {
    match manifest_files(dir) {
        Ok(files) => Fingerprint::Files(
            files
                .into_iter()
                .map(|file| {
                    let meta = fs::metadata(&file).ok();
                    let mtime = meta.as_ref().and_then(|m| m.modified().ok());
                    let len = meta.map(|m| m.len());
                    (file, mtime, len)
                })
                .collect(),
        ),
        Err(err) => Fingerprint::Unreadable(err.to_string()),
    }
}

/// The manifest files of `dir`, sorted by name.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_dir_error = |source| ManifestError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        let Some(name) = path.file_name() else {
            continue;
        };
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let wanted = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json");
        // Follows symbolic links; one that dangles is kept so that reading it reports why.
        let is_dir = fs::metadata(&path).is_ok_and(|m| m.is_dir());
        if wanted && !is_dir {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// One document of one file, with what is needed to point back into the text.
struct Doc<'a> {
    file: &'a Path,
    text: &'a str,
    index: usize,
}

impl Doc<'_> {
    fn at(&self, loc: Option<serde_yaml::Location>) -> Location {
        Location {
            file: self.file.to_path_buf(),
            line: loc.as_ref().and_then(|l| u32::try_from(l.line()).ok()),
            column: loc.as_ref().and_then(|l| u32::try_from(l.column()).ok()),
        }
    }

    fn parse_error(&self, err: serde_yaml::Error) -> ManifestError {
        let loc = err.location();
        let mut message = err.to_string();
        // The location goes in front, as file:line:column; no need to repeat it.
        if let Some(l) = &loc {
            let suffix = format!(" at line {} column {}", l.line(), l.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_string();
            }
        }
        ManifestError::Parse {
            at: self.at(loc),
            message,
        }
    }

    /// The document again, straight from the text: unlike values, it carries positions.
    fn reparse(&self) -> Option<serde_yaml::Deserializer<'_>> {
        serde_yaml::Deserializer::from_str(self.text).nth(self.index)
    }

    /// The position of the node at `path`, or of its nearest ancestor that exists.
    fn locate(&self, path: &[Seg]) -> Location {
        // An object from the API server: no text to point into.
        if self.text.is_empty() {
            return self.at(None);
        }
        for len in (0..=path.len()).rev() {
            let Some(de) = self.reparse() else { break };
            // The walk fails on purpose when it reaches the node, so that serde_yaml
            // attaches the node's position to the error.
            let walk = Walk {
                path: &path[..len],
                seed: Hit,
            };
            if let Err(err) = walk.deserialize(de) {
                if err.to_string().contains(HIT) {
                    return self.at(err.location());
                }
            }
        }
        self.at(None)
    }

    /// `value` (the node at `path`) as a `T`; on failure the error is located by decoding
    /// the same node from the text.
    fn typed<T: DeserializeOwned>(&self, value: Value, path: &[Seg]) -> Result<T, ManifestError> {
        serde_yaml::from_value(value).map_err(|value_err| {
            let located = self.reparse().and_then(|de| {
                Walk {
                    path,
                    seed: PhantomData::<T>,
                }
                .deserialize(de)
                .err()
            });
            match located {
                Some(err) if err.location().is_some() => self.parse_error(err),
                _ => ManifestError::Parse {
                    at: self.locate(path),
                    message: value_err.to_string(),
                },
            }
        })
    }
}

const HIT: &str = "\u{1}interceptor-locate-hit";

/// Walks `path` through a document and hands the node found there to `seed`; `None` when
/// the path does not exist.
struct Walk<'p, S> {
    path: &'p [Seg],
    seed: S,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Walk<'_, S> {
    type Value = Option<S::Value>;

    fn deserialize<D: de::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        match self.path.split_first() {
            None => self.seed.deserialize(de).map(Some),
            Some((step, rest)) => {
                let visitor = WalkVisitor {
                    step: *step,
                    walk: Walk {
                        path: rest,
                        seed: self.seed,
                    },
                };
                match step {
                    Seg::Key(_) => de.deserialize_map(visitor),
                    Seg::Index(_) => de.deserialize_seq(visitor),
                }
            }
        }
    }
}

struct WalkVisitor<'p, S> {
    step: Seg,
    walk: Walk<'p, S>,
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for WalkVisitor<'_, S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or sequence")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let want = match self.step {
            Seg::Key(key) => Some(key),
            Seg::Index(_) => None,
        };
        let mut walk = Some(self.walk);
        let mut found = None;
        // Every entry is consumed, so that serde_yaml does not complain about leftovers.
        while let Some(key) = map.next_key::<Value>()? {
            let here = want.is_some() && key.as_str() == want;
            match walk.take_if(|_| here) {
                Some(w) => found = map.next_value_seed(w)?,
                None => map.next_value::<IgnoredAny>().map(drop)?,
            }
        }
        Ok(found)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let Seg::Index(want) = self.step else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(None);
        };
        let mut walk = Some(self.walk);
        let mut found = None;
        for i in 0.. {
            let more = match walk.take_if(|_| i == want) {
                Some(w) => seq.next_element_seed(w)?.map(|v| found = v).is_some(),
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                break;
            }
        }
        Ok(found)
    }
}

/// Fails with [`HIT`] on whatever node it is given.
struct Hit;

impl<'de> DeserializeSeed<'de> for Hit {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(HitVisitor)
    }
}

struct HitVisitor;

impl HitVisitor {
    fn hit<T, E: de::Error>(self) -> Result<T, E> {
        Err(E::custom(HIT))
    }
}

impl<'de> Visitor<'de> for HitVisitor {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.hit()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.hit()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.hit()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.hit()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.hit()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.hit()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.hit()
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<(), E> {
        self.hit()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.hit()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.hit()
    }
    fn visit_some<D: de::Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        self.hit()
    }
    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        self.hit()
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.hit()
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.hit()
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.hit()
    }
}

/// Where an object was defined, to point at both places of a duplicate.
struct Origin {
    file: usize,
    doc: usize,
    path: Vec<Seg>,
}

#[derive(Default)]
struct Loader {
    model: Model,
    /// Every file read so far, kept to locate the first definition of a duplicate.
    files: Vec<(PathBuf, String)>,
    seen: HashMap<(&'static str, String), Origin>,
}

impl Loader {
    fn load_file(&mut self, file: PathBuf, text: String) -> Result<(), ManifestError> {
        self.files.push((file, text));
        let file_idx = self.files.len() - 1;
        let mut objects = Vec::new();
        {
            let (file, text) = &self.files[file_idx];
            for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
                let doc = Doc { file, text, index };
                let value = Value::deserialize(de).map_err(|err| doc.parse_error(err))?;
                // Empty documents, e.g. after a trailing `---`.
                if value.is_null() {
                    continue;
                }
                collect_objects(&doc, value, Vec::new(), &mut objects)?;
            }
        }
        for object in objects {
            self.add(file_idx, object)?;
        }
        Ok(())
    }

    fn add(&mut self, file_idx: usize, object: Object) -> Result<(), ManifestError> {
        let (kind, id) = match &object.item {
            Item::Namespace(ns) => ("Namespace", ns.name.clone()),
            Item::Pod(pod) => ("Pod", pod.key().to_string()),
            Item::Service(svc) => ("Service", svc.key().to_string()),
            Item::EndpointSlice(slice) => ("EndpointSlice", slice.key()),
            Item::Routing(o) => (o.kind(), o.key()),
        };
        let origin = Origin {
            file: file_idx,
            doc: object.doc,
            path: object.path,
        };
        if let Some(first) = self.seen.get(&(kind, id.clone())) {
            return Err(ManifestError::Duplicate {
                object: format!("{kind} {id}"),
                first: self.name_location(first),
                second: self.name_location(&origin),
            });
        }
        self.seen.insert((kind, id), origin);
        match object.item {
            Item::Namespace(ns) => {
                self.model.namespaces.insert(ns.name.clone(), ns);
            }
            Item::Pod(pod) => {
                self.model.pods.insert(pod.key(), pod);
            }
            Item::Service(svc) => {
                self.model.services.insert(svc.key(), svc);
            }
            Item::EndpointSlice(slice) => match slice.service {
                Some(svc) => self
                    .model
                    .endpoint_slices
                    .entry(svc)
                    .or_default()
                    .extend(slice.ports),
                None => debug!(
                    slice = %slice.key(),
                    "skipping an EndpointSlice without the {SERVICE_NAME_LABEL} label"
                ),
            },
            Item::Routing(mut o) => {
                o.set_order(self.seen.len());
                o.insert_into(std::sync::Arc::make_mut(&mut self.model.routing));
            }
        }
        Ok(())
    }

    fn name_location(&self, origin: &Origin) -> Location {
        let (file, text) = &self.files[origin.file];
        let doc = Doc {
            file,
            text,
            index: origin.doc,
        };
        let mut path = origin.path.clone();
        path.extend([Seg::Key("metadata"), Seg::Key("name")]);
        doc.locate(&path)
    }
}

enum Item {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(Slice),
    Routing(RoutingObject),
}

struct Object {
    doc: usize,
    /// Path of the object in its document: empty, or into the items of a List.
    path: Vec<Seg>,
    item: Item,
}

fn collect_objects(
    doc: &Doc<'_>,
    value: Value,
    path: Vec<Seg>,
    out: &mut Vec<Object>,
) -> Result<(), ManifestError> {
    let not_an_object = |message: String| ManifestError::NotAnObject {
        at: doc.locate(&path),
        message,
    };
    let Value::Mapping(mut map) = value else {
        return Err(not_an_object(
            "not a Kubernetes object (a mapping with apiVersion and kind)".into(),
        ));
    };
    let string_field = |key: &'static str| match map.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(ManifestError::NotAnObject {
            at: doc.locate(&[path.as_slice(), &[Seg::Key(key)]].concat()),
            message: format!("{key} is not a string"),
        }),
    };
    let (api_version, kind) = (string_field("apiVersion")?, string_field("kind")?);
    let (api_version, kind) = match (api_version, kind) {
        (Some(a), Some(k)) => (a, k),
        (None, Some(k)) => return Err(not_an_object(format!("{k} object without apiVersion"))),
        (Some(_), None) => return Err(not_an_object("object without kind".into())),
        (None, None) => return Err(not_an_object("object without apiVersion and kind".into())),
    };
    if (api_version.as_str(), kind.as_str()) == ("v1", "List") {
        let items = match map.remove("items") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(items)) => items,
            Some(_) => {
                let mut at = path.clone();
                at.push(Seg::Key("items"));
                return Err(ManifestError::NotAnObject {
                    at: doc.locate(&at),
                    message: "items of a List is not a sequence".into(),
                });
            }
        };
        for (i, item) in items.into_iter().enumerate() {
            let mut item_path = path.clone();
            item_path.extend([Seg::Key("items"), Seg::Index(i)]);
            collect_objects(doc, item, item_path, out)?;
        }
        return Ok(());
    }
    let Some(object_kind) = ObjectKind::of(&api_version, &kind) else {
        let at = doc.locate(&path);
        debug!(
            at = %at,
            api_version,
            kind,
            "skipping an object of a kind the agent does not use"
        );
        return Ok(());
    };
    let item = match object_kind {
        ObjectKind::Namespace => {
            let ns: k8s::Namespace = doc.typed(Value::Mapping(map), &path)?;
            Item::Namespace(converted(doc, &path, objects::namespace(ns))?)
        }
        ObjectKind::Pod => {
            let pod: k8s::Pod = doc.typed(Value::Mapping(map), &path)?;
            Item::Pod(converted(doc, &path, objects::pod(pod))?)
        }
        ObjectKind::Service => {
            let svc: k8s::Service = doc.typed(Value::Mapping(map), &path)?;
            Item::Service(converted(doc, &path, objects::service(svc))?)
        }
        ObjectKind::EndpointSlice => {
            let slice: discovery::EndpointSlice = doc.typed(Value::Mapping(map), &path)?;
            Item::EndpointSlice(converted(doc, &path, objects::endpoint_slice(slice))?)
        }
        ObjectKind::Routing(kind) => {
            let yaml = YamlObject {
                doc,
                path: &path,
                map,
            };
            Item::Routing(objects::routing_object(kind, yaml)?)
        }
    };
    out.push(Object {
        doc: doc.index,
        path,
        item,
    });
    Ok(())
}

/// A routing object's document in a file: type errors point at their line.
struct YamlObject<'a, 'd> {
    doc: &'a Doc<'d>,
    path: &'a [Seg],
    map: serde_yaml::Mapping,
}

impl Decode for YamlObject<'_, '_> {
    type Error = ManifestError;

    fn decode<S: DeserializeOwned + Default>(
        &mut self,
        _: RoutingKind,
    ) -> Result<(ObjectMeta, S), ManifestError> {
        #[derive(Deserialize)]
        struct Object<S> {
            #[serde(default)]
            metadata: ObjectMeta,
            #[serde(default)]
            spec: S,
        }
        let map = std::mem::take(&mut self.map);
        let object: Object<S> = self.doc.typed(Value::Mapping(map), self.path)?;
        Ok((object.metadata, object.spec))
    }

    fn reject(&self, error: ObjectError) -> ManifestError {
        located(self.doc, self.path, error)
    }
}

/// What the object at `path` in `doc` converts to, with a conversion error located at the
/// field it names.
fn converted<T>(
    doc: &Doc<'_>,
    path: &[Seg],
    result: Result<T, ObjectError>,
) -> Result<T, ManifestError> {
    result.map_err(|error| located(doc, path, error))
}

fn located(doc: &Doc<'_>, path: &[Seg], error: ObjectError) -> ManifestError {
    ManifestError::InvalidValue {
        at: doc.locate(&[path, error.field().segments()].concat()),
        error: Box::new(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        IpFamily, NamedPort, PodAddrs, PodKey, ServiceKey, SliceEndpoint, SlicePort, TargetPort,
    };
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn load_one(text: &str) -> Result<Model, ManifestError> {
        load_str(Path::new("m.yaml"), text)
    }

    fn err_of(text: &str) -> ManifestError {
        load_one(text).expect_err("should not load")
    }

    fn line_col(err: &ManifestError) -> (PathBuf, Option<u32>, Option<u32>) {
        let at = err.location().expect("a location");
        (at.file.clone(), at.line, at.column)
    }

    const MULTI: &str = "\
# A namespace, a pod, a service and a deployment in one file.
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: demo
  labels: {app: echo}
  annotations: {note: x}
spec:
  serviceAccountName: echo
  containers:
    - name: a
      image: busybox
      ports:
        - {name: tcp-echo, containerPort: 9000}
        - {containerPort: 9090, protocol: UDP}
    - name: b
      image: busybox
      ports: [{name: admin, containerPort: 15000}]
status:
  podIP: 10.0.0.7
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports:
    - {name: tcp, port: 80, targetPort: tcp-echo}
    - {port: 8080}
    - {port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec: {containers: [{name: a, image: busybox}]}
---
";

    #[test]
    fn multi_document_file() {
        let m = load_one(MULTI).unwrap();
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(
            m.namespaces["demo"].labels["istio.io/dataplane-mode"],
            "ambient"
        );

        let pod = m.pod(&PodKey::new("demo", "server")).expect("pod");
        assert_eq!(pod.ip, Some(Ipv4Addr::new(10, 0, 0, 7)));
        assert_eq!(pod.service_account, "echo");
        assert_eq!(pod.labels, BTreeMap::from([("app".into(), "echo".into())]));
        assert_eq!(pod.annotations["note"], "x");
        assert_eq!(
            pod.container_ports,
            vec![
                NamedPort {
                    name: Some("tcp-echo".into()),
                    port: 9000
                },
                NamedPort {
                    name: None,
                    port: 9090
                },
                NamedPort {
                    name: Some("admin".into()),
                    port: 15000
                },
            ]
        );

        let svc = m
            .service(&ServiceKey::new("demo", "echo"))
            .expect("service");
        assert_eq!(svc.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(svc.selector["app"], "echo");
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|p| {
                (
                    p.name.as_deref(),
                    p.port,
                    p.target_port.clone(),
                    p.protocol.as_str(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            vec![
                (Some("tcp"), 80, TargetPort::Name("tcp-echo".into()), "TCP"),
                (None, 8080, TargetPort::Number(8080), "TCP"),
                (None, 53, TargetPort::Number(5353), "UDP"),
            ]
        );

        // The Deployment is skipped, not an error, and adds nothing.
        assert_eq!(m.pods.len(), 1);
        assert_eq!(m.services.len(), 1);

        // The model is what /config_dump shows.
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(
            json["services"]["demo/echo"]["ports"][0]["target_port"],
            "tcp-echo"
        );
        assert_eq!(
            json["services"]["demo/echo"]["ports"][1]["target_port"],
            8080
        );
    }

    #[test]
    fn defaults_and_headless() {
        let m = load_one(
            "\
apiVersion: v1
kind: Pod
metadata: {name: bare}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: ''}
spec:
  serviceAccount: legacy-sa
  containers: []
status: {podIP: ''}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80, targetPort: 0}]}
---
apiVersion: v1
kind: Service
metadata: {name: external}
spec: {type: ExternalName, externalName: example.com}
",
        )
        .unwrap();
        let bare = m.pod(&PodKey::new("default", "bare")).expect("bare");
        assert_eq!(bare.service_account, "default");
        assert_eq!(bare.ip, None);
        assert!(bare.container_ports.is_empty());
        let old = m.pod(&PodKey::new("default", "old")).expect("old");
        assert_eq!(old.service_account, "legacy-sa");
        assert_eq!(old.ip, None);
        let headless = m.service(&ServiceKey::new("default", "headless")).unwrap();
        assert_eq!(headless.cluster_ip, None);
        assert_eq!(headless.ports[0].target_port, TargetPort::Number(80));
        let external = m.service(&ServiceKey::new("default", "external")).unwrap();
        assert_eq!(external.cluster_ip, None);
        assert!(external.ports.is_empty());
    }

    #[test]
    fn list_objects_are_unpacked() {
        let m = load_one(
            "\
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Namespace
    metadata: {name: a}
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: skipped}
  - apiVersion: v1
    kind: Pod
    metadata: {name: p, namespace: a}
",
        )
        .unwrap();
        assert!(m.namespaces.contains_key("a"));
        assert!(m.pods.contains_key(&PodKey::new("a", "p")));

        // Errors inside a List point into it.
        let err = err_of(
            "\
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: s}
    spec:
      clusterIP: 10.96.0.1
      ports:
        - port: 80
  - apiVersion: v1
    kind: Service
    metadata: {name: t}
    spec:
      ports:
        - port: seventy
",
        );
        assert_eq!(
            line_col(&err),
            ("m.yaml".into(), Some(16), Some(17)),
            "{err}"
        );
        assert!(err.to_string().contains("expected i32"), "{err}");
    }

    #[test]
    fn load_dir_reads_manifest_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "b.yml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: from-yml}\n",
        );
        write(
            dir.path(),
            "a.json",
            "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"Namespace\",\n\t\"metadata\": {\"name\": \"from-json\"}\n}\n",
        );
        write(
            dir.path(),
            "c.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: from-yaml}\n",
        );
        // Not manifests: hidden, other extensions, subdirectories.
        write(dir.path(), ".hidden.yaml", "not: [valid");
        write(dir.path(), "notes.txt", "not: [valid");
        write(dir.path(), "c.yaml~", "not: [valid");
        fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        write(&dir.path().join("sub.yaml"), "deeper.yaml", "not: [valid");

        let m = load_dir(dir.path()).unwrap();
        let names: Vec<_> = m.namespaces.keys().map(String::as_str).collect();
        assert_eq!(names, ["from-json", "from-yaml", "from-yml"]);

        let files = manifest_files(dir.path()).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.json", "b.yml", "c.yaml"]);
    }

    #[test]
    fn empty_files_and_documents() {
        let m = load_one("").unwrap();
        assert_eq!(m, Model::default());
        let m = load_one("# nothing yet\n---\n---\n").unwrap();
        assert_eq!(m, Model::default());
    }

    #[test]
    fn missing_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = load_dir(&missing).unwrap_err();
        assert!(matches!(err, ManifestError::ReadDir { .. }), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn syntax_error_in_third_document_has_absolute_line() {
        let dir = tempfile::tempdir().unwrap();
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: one}
---
apiVersion: v1
kind: Namespace
metadata: {name: two}
---
apiVersion: v1
kind: Namespace
metadata:
  name: three
  labels: [unclosed
";
        let file = write(dir.path(), "broken.yaml", text);
        let err = load_dir(dir.path()).unwrap_err();
        assert!(matches!(err, ManifestError::Parse { .. }), "{err:?}");
        let (at_file, line, _) = line_col(&err);
        assert_eq!(at_file, file);
        // libyaml notices the unclosed flow sequence at the end of the input.
        assert_eq!(line, Some(14), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("{}:14:", file.display())),
            "{err}"
        );
    }

    #[test]
    fn type_error_in_third_document_has_absolute_line() {
        let err = err_of(
            "\
apiVersion: v1
kind: Namespace
metadata: {name: one}
---
apiVersion: v1
kind: Namespace
metadata: {name: two}
---
# comment
apiVersion: v1
kind: Service
metadata: {name: s, namespace: demo}
spec:
  ports:
    - name: web
      port: eighty
",
        );
        assert!(matches!(err, ManifestError::Parse { .. }), "{err:?}");
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(16), Some(13)));
        assert_eq!(
            err.to_string(),
            "m.yaml:16:13: spec.ports[0].port: invalid type: string \"eighty\", expected i32"
        );
    }

    #[test]
    fn duplicate_key_is_located() {
        // serde_yaml points at the mapping holding the duplicate.
        let err = err_of("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  name: b\n");
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(4), Some(3)), "{err}");
        assert!(
            err.to_string()
                .contains("duplicate entry with key \"name\""),
            "{err}"
        );
    }

    #[test]
    fn missing_kind_or_api_version_is_an_error() {
        let err = err_of(
            "\
apiVersion: v1
kind: Namespace
metadata: {name: one}
---

apiVersion: v1
metadata: {name: two}
",
        );
        assert!(matches!(err, ManifestError::NotAnObject { .. }), "{err:?}");
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(6), Some(1)));
        assert_eq!(err.to_string(), "m.yaml:6:1: object without kind");

        let err = err_of("---\nkind: Pod\nmetadata: {name: p}\n");
        assert_eq!(line_col(&err).1, Some(2));
        assert!(
            err.to_string().ends_with("Pod object without apiVersion"),
            "{err}"
        );

        let err =
            err_of("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n- a\n- list\n");
        assert_eq!(line_col(&err).1, Some(5));
        assert!(err.to_string().contains("not a Kubernetes object"), "{err}");

        let err = err_of("apiVersion: v1\nkind: [Pod]\n");
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(2), Some(7)));
        assert!(err.to_string().ends_with("kind is not a string"), "{err}");
    }

    fn invalid(err: &ManifestError) -> (&str, &str) {
        match err {
            ManifestError::InvalidValue { error, .. } => {
                let ObjectError::InvalidValue { object, field, .. } = &**error;
                (object, field.as_str())
            }
            other => panic!("not an invalid value: {other:?}"),
        }
    }

    #[test]
    fn invalid_cluster_ip() {
        let err = err_of(
            "\
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: demo
spec:
  clusterIP: banana
  ports: [{port: 80}]
",
        );
        assert_eq!(invalid(&err), ("Service demo/echo", "spec.clusterIP"));
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(11), Some(14)));
        assert_eq!(
            err.to_string(),
            "m.yaml:11:14: Service demo/echo: spec.clusterIP: \"banana\" is not an IP address or \"None\""
        );

        // An IPv6 cluster IP is fine; a bad one, or one of a family the Service does not
        // list, is named with its line.
        let six = |spec: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: six}}\nspec: {spec}\n")
        };
        let m = load_one(&six("{clusterIP: 'fd00::1'}")).unwrap();
        let svc = &m.services[&ServiceKey::new("default", "six")];
        assert_eq!(svc.cluster_ipv6, Some("fd00::1".parse().unwrap()));
        let err = err_of(&six("{clusterIP: 'fd00::zz'}"));
        assert_eq!(invalid(&err), ("Service default/six", "spec.clusterIP"));
        assert_eq!(line_col(&err).1, Some(4));
        let err = err_of(&six(
            "{clusterIPs: [10.96.0.1, 'fd00::1'], ipFamilies: [IPv4]}",
        ));
        assert_eq!(invalid(&err), ("Service default/six", "spec.clusterIPs[1]"));
        assert_eq!(line_col(&err).1, Some(4));
    }

    #[test]
    fn invalid_ports() {
        let svc = |ports: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: n}}\nspec:\n  ports:\n{ports}"
            )
        };
        let err = err_of(&svc("    - port: 0\n"));
        assert_eq!(invalid(&err), ("Service n/s", "spec.ports[0].port"));
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(6), Some(13)));
        assert!(
            err.to_string()
                .ends_with("0 is not a port number (1-65535)"),
            "{err}"
        );

        let err = err_of(&svc("    - port: 80\n    - port: 65536\n"));
        assert_eq!(invalid(&err), ("Service n/s", "spec.ports[1].port"));
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(7), Some(13)));

        let err = err_of(&svc("    - port: 80\n      targetPort: 70000\n"));
        assert_eq!(invalid(&err), ("Service n/s", "spec.ports[0].targetPort"));
        assert_eq!(line_col(&err).1, Some(7));

        let err = err_of(&svc("    - port: 80\n      targetPort: \"8080\"\n"));
        assert_eq!(invalid(&err), ("Service n/s", "spec.ports[0].targetPort"));
        assert_eq!(line_col(&err).1, Some(7));

        let err = err_of(
            "\
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: n}
spec:
  containers:
    - name: a
      ports: [{containerPort: 80}]
    - name: b
      ports:
        - containerPort: 81
        - containerPort: -1
",
        );
        assert_eq!(
            invalid(&err),
            ("Pod n/p", "spec.containers[1].ports[1].containerPort")
        );
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(11), Some(26)));
    }

    #[test]
    fn invalid_pod_ip() {
        let err = err_of(
            "\
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: n}
status:
  phase: Running
  podIP: fd00::zz
",
        );
        assert_eq!(invalid(&err), ("Pod n/p", "status.podIP"));
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(7), Some(10)));
        assert!(
            err.to_string()
                .contains("\"fd00::zz\" is not an IP address"),
            "{err}"
        );
    }

    #[test]
    fn missing_name() {
        let err = err_of("apiVersion: v1\nkind: Pod\nmetadata:\n  namespace: n\n");
        assert_eq!(invalid(&err), ("Pod n/?", "metadata.name"));
        // Points at the metadata that lacks the name.
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(4), Some(3)));

        let err = err_of("apiVersion: v1\nkind: Namespace\n");
        assert_eq!(invalid(&err), ("Namespace ?", "metadata.name"));
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(1), Some(1)));
    }

    #[test]
    fn duplicates_name_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let first = write(
            dir.path(),
            "a.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\n",
        );
        let second = write(
            dir.path(),
            "b.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: echo, namespace: demo}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {namespace: demo, name: echo}\n",
        );
        let err = load_dir(dir.path()).unwrap_err();
        match &err {
            ManifestError::Duplicate {
                object,
                first: a,
                second: b,
            } => {
                assert_eq!(object, "Service demo/echo");
                assert_eq!((&a.file, a.line, a.column), (&first, Some(4), Some(9)));
                assert_eq!((&b.file, b.line, b.column), (&second, Some(7), Some(35)));
            }
            other => panic!("not a duplicate: {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains(&format!("{}:4:9", first.display())), "{text}");
        assert!(
            text.contains(&format!("{}:7:35", second.display())),
            "{text}"
        );

        // Same name in another namespace, or of another kind, is no duplicate; the same
        // namespace twice in one file is.
        let m = load_one(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: a}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: b}\n",
        )
        .unwrap();
        assert_eq!(m.pods.len(), 2);
        let err = err_of(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n",
        );
        assert_eq!(
            err.to_string(),
            "Namespace a is defined twice: at m.yaml:3:18 and at m.yaml:8:54"
        );
    }

    #[test]
    fn demo_example_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let m = load_dir(&dir).unwrap();
        let key = |name: &str| PodKey::new("demo", name);
        for name in ["client", "server-v1", "server-v2"] {
            let e = m.enrollment(&key(name)).unwrap();
            assert!(e.enrolled, "{name}: {}", e.reason);
            assert_eq!(
                e.reason,
                "namespace demo label istio.io/dataplane-mode=ambient"
            );
        }
        let outsider = m.enrollment(&PodKey::new("legacy", "outsider")).unwrap();
        assert!(!outsider.enrolled, "{}", outsider.reason);

        let (svc, sp) = m
            .service_for(Ipv4Addr::new(10, 96, 0, 10).into(), 80)
            .unwrap();
        assert_eq!(svc.name, "echo");
        // No podIP in the manifests: endpoints appear once the CNI plugin reports addresses.
        assert!(m
            .endpoints(svc, sp, &HashMap::new(), IpFamily::V4)
            .is_empty());
        let cni = HashMap::from([
            (
                key("server-v1"),
                PodAddrs::v4(Ipv4Addr::new(10, 244, 0, 11)),
            ),
            (
                key("server-v2"),
                PodAddrs::v4(Ipv4Addr::new(10, 244, 0, 12)),
            ),
            (key("client"), PodAddrs::v4(Ipv4Addr::new(10, 244, 0, 10))),
        ]);
        let eps: Vec<String> = m
            .endpoints(svc, sp, &cni, IpFamily::V4)
            .iter()
            .map(|e| format!("{} {}", e.pod, e.addr))
            .collect();
        assert_eq!(
            eps,
            [
                "demo/server-v1 10.244.0.11:9000",
                "demo/server-v2 10.244.0.12:9000"
            ]
        );
    }

    const SLICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{name: tcp, port: 80, targetPort: tcp-echo}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-abcde
  namespace: demo
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
ports: [{name: tcp, port: 9000, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.7]
    conditions: {ready: true}
    targetRef: {kind: Pod, name: server-v2, namespace: demo}
  - addresses: [10.244.1.8]
    conditions: {ready: false, terminating: true}
    targetRef: {kind: Pod, name: server-old, namespace: demo}
  - addresses: [192.168.9.9]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-v6
  namespace: demo
  labels: {kubernetes.io/service-name: echo}
addressType: IPv6
ports: [{name: tcp, port: 9000}]
endpoints: [{addresses: ['fd00::7']}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: demo}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}]
";

    #[test]
    fn endpoint_slices_feed_the_endpoints() {
        let m = load_one(SLICES).unwrap();
        let key = ServiceKey::new("demo", "echo");
        assert_eq!(
            m.endpoint_slices[&key],
            vec![
                SlicePort {
                    name: Some("tcp".into()),
                    port: 9000,
                    protocol: "TCP".into(),
                    endpoints: vec![
                        SliceEndpoint {
                            ip: Ipv4Addr::new(10, 244, 1, 7).into(),
                            pod: Some(PodKey::new("demo", "server-v2")),
                        },
                        SliceEndpoint {
                            ip: Ipv4Addr::new(192, 168, 9, 9).into(),
                            pod: None,
                        },
                    ],
                },
                // The IPv6 slice of the dual-stack service: its IPv6 VIP's endpoints.
                SlicePort {
                    name: Some("tcp".into()),
                    port: 9000,
                    protocol: "TCP".into(),
                    endpoints: vec![SliceEndpoint {
                        ip: "fd00::7".parse().unwrap(),
                        pod: None,
                    }],
                }
            ]
        );
        assert_eq!(m.endpoint_slices.len(), 1, "the orphan slice is skipped");
        let (svc, sp) = m
            .service_for(Ipv4Addr::new(10, 96, 0, 10).into(), 80)
            .unwrap();
        let eps: Vec<String> = m
            .endpoints(svc, sp, &HashMap::new(), IpFamily::V4)
            .iter()
            .map(|e| format!("{} {}", e.pod, e.addr))
            .collect();
        assert_eq!(
            eps,
            [
                "demo/192.168.9.9 192.168.9.9:9000",
                "demo/server-v2 10.244.1.7:9000"
            ]
        );

        let v6: Vec<String> = m
            .endpoints(svc, sp, &HashMap::new(), IpFamily::V6)
            .iter()
            .map(|e| format!("{} {}", e.pod, e.addr))
            .collect();
        assert_eq!(v6, ["demo/fd00::7 [fd00::7]:9000"]);
        // A bad IPv6 address, and an IPv4 address in an IPv6 slice, are named.
        for (bad, what) in [("fd00::zz", "\"fd00::zz\""), ("10.9.9.9", "\"10.9.9.9\"")] {
            let err = err_of(&SLICES.replace("'fd00::7'", bad));
            assert_eq!(
                invalid(&err),
                ("EndpointSlice demo/echo-v6", "endpoints[0].addresses[0]")
            );
            assert!(
                err.to_string()
                    .contains(&format!("{what} is not an IPv6 address (addressType IPv6)")),
                "{err}"
            );
        }
        let err = err_of(&SLICES.replace("192.168.9.9", "192.168.9.300"));
        assert_eq!(
            invalid(&err),
            ("EndpointSlice demo/echo-abcde", "endpoints[2].addresses[0]")
        );
        assert_eq!(line_col(&err), ("m.yaml".into(), Some(24), Some(17)));
        let err = err_of(&SLICES.replace("port: 9000, protocol", "port: 0, protocol"));
        assert_eq!(
            invalid(&err),
            ("EndpointSlice demo/echo-abcde", "ports[0].port")
        );
        let err = err_of(&SLICES.replacen("name: echo-abcde", "name: echo-v6", 1));
        assert!(
            err.to_string()
                .starts_with("EndpointSlice demo/echo-v6 is defined twice"),
            "{err}"
        );
    }

    async fn wait_for(
        rx: &mut watch::Receiver<ManifestState>,
        what: &str,
        f: impl FnMut(&ManifestState) -> bool,
    ) -> ManifestState {
        let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f))
            .await
            .map(|r| r.map(|state| state.clone()));
        match waited {
            Ok(Ok(state)) => state,
            Ok(Err(err)) => panic!("watch closed waiting for {what}: {err}"),
            Err(_) => panic!("timed out waiting for {what}: {:?}", rx.borrow()),
        }
    }

    #[tokio::test]
    async fn watch_keeps_last_good_model_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: one}\n",
        );
        let (tx, mut rx) = watch::channel(ManifestState::default());
        let task = watch_dir(dir.path().to_path_buf(), Duration::from_millis(20), tx);

        let first = wait_for(&mut rx, "first load", |s| s.generation > 0).await;
        assert_eq!(first.generation, 1);
        assert_eq!(first.last_error, None);
        assert!(first.model.namespaces.contains_key("one"));

        let broken = write(
            dir.path(),
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: banana\n",
        );
        let failed = wait_for(&mut rx, "the error", |s| s.last_error.is_some()).await;
        assert_eq!(failed.generation, 1);
        assert!(Arc::ptr_eq(&failed.model, &first.model), "model unchanged");
        let error = failed.last_error.unwrap();
        assert!(
            error.starts_with(&format!(
                "{}:5:14: Service default/s: spec.clusterIP",
                broken.display()
            )),
            "{error}"
        );

        write(
            dir.path(),
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: 10.96.0.1\n",
        );
        let fixed = wait_for(&mut rx, "the fix", |s| s.generation > 1).await;
        assert_eq!(fixed.generation, 2);
        assert_eq!(fixed.last_error, None);
        assert!(fixed.model.namespaces.contains_key("one"));
        assert_eq!(
            fixed.model.services[&ServiceKey::new("default", "s")].cluster_ip,
            Some(Ipv4Addr::new(10, 96, 0, 1))
        );

        // Removing a file is a change too.
        fs::remove_file(dir.path().join("ns.yaml")).unwrap();
        let removed = wait_for(&mut rx, "the removal", |s| s.generation > 2).await;
        assert!(removed.model.namespaces.is_empty());

        task.abort();
    }
}
