//! The Kubernetes source: kube-rs watchers on the API server feeding the same
//! [`ManifestState`] channel as the manifest directory (DESIGN.md section 4), so the agent
//! does not care which source runs.
//!
//! Four watches: all Pods (every node's: the routing needs the identity and labels of
//! remote workloads for SMI policy and DestinationRule subsets), Namespaces, Services and
//! EndpointSlices (`discovery.k8s.io/v1`); and one per routing
//! CRD (`routing`: Istio, Gateway API, SMI), where a CRD the cluster lacks counts as
//! listed and empty. Each runs through
//! [`kube::runtime::watcher()`] with the standard configuration (watch bookmarks requested,
//! consistent lists in pages of 500) and its default backoff: a dropped watch is resumed
//! from the last resource version seen (bookmarks included), a `410 Gone` starts over with
//! a fresh list.
//!
//! Objects are converted by [`super::objects`], as the manifest source converts them, so the
//! model is the one a directory of the same objects would give, with one addition: every
//! Service gets an entry in [`Model::endpoint_slices`], empty until its slices arrive, so
//! that endpoints come from the slices only and never from the selector (slices say which
//! endpoints are ready; the selector does not). An object the
//! conversion rejects (a `podIP` that is no IP address, a port out of range) is left out of the model with
//! a warning naming it, the field and the value.
//!
//! With [`KubeSourceConfig::mesh_config`] set, one more watch: FSM's MeshConfig object of
//! that name (`config.flomesh.io/v1alpha3`, the version FSM's CRD stores; `v1alpha1` and
//! `v1alpha2` are deprecated and lack fields), by a field selector on its name in its
//! namespace. Its `spec.traffic` is published as [`ManifestState::mesh_config`] (see
//! [`crate::config`] for how it meets the file). Like a routing CRD, a cluster without the
//! CRD (404) has no object, and a forbidden list (403) is reported without holding the
//! model back; a version that does not validate is rejected, reported in `last_error` and
//! the log, and the previous valid version stays.
//!
//! What is published on the channel:
//! - `generation` stays 0 until the initial lists of all four kinds are complete; then it
//!   is 1, and is bumped each time the model changes. A re-list (after a 410) replaces the
//!   objects of its kind at once when it completes; until then the previous ones stay.
//! - `last_error` holds the errors of the watches that are failing, e.g.
//!   `watch pods: failed to perform initial object list: …`, while the last model stays in
//!   force; a watch's error is cleared when it recovers: when the API server accepts its
//!   next watch request, or a list of it completes, or an event of it arrives.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::api::Api;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Resource;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::manifests::ManifestState;
use super::objects::{self, ObjectError, RoutingKind, Slice};
use crate::config::{MeshConfigName, MeshConfigObject, TrafficSettings};
use crate::model::routing::RoutingObjects;
use crate::model::{Model, Namespace, Pod, PodKey, Service, ServiceKey, SlicePort};

mod routing;
use crate::model::routing::RoutingObject;

/// What the Kubernetes source needs besides a client.
#[derive(Clone, Debug, Default)]
pub struct KubeSourceConfig {
    /// The node the agent runs on (the DaemonSet passes `spec.nodeName` as `NODE_NAME`),
    /// named in its logs.
    pub node_name: String,
    /// FSM's MeshConfig object to watch; `None`: none (the gateway has no use for it).
    pub mesh_config: Option<MeshConfigName>,
}

/// Why the Kubernetes source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("no node name: the Kubernetes source watches the pods of one node (set NODE_NAME)")]
    NoNodeName,
    #[error("no Kubernetes client configuration (in-cluster service account or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
}

/// A client for the cluster the agent runs in: the kubeconfig of `KUBECONFIG` (or
/// `~/.kube/config`) when there is one, else the in-cluster service account
/// ([`kube::Client::try_default`]). Must be called within a Tokio runtime.
pub async fn client_from_env() -> Result<kube::Client, KubeSourceError> {
    kube::Client::try_default()
        .await
        .map_err(KubeSourceError::Client)
}

/// A client from the kubeconfig at `path` (`--kubeconfig`), or [`client_from_env`].
pub async fn client_from(path: Option<&std::path::Path>) -> Result<kube::Client, KubeSourceError> {
    let Some(path) = path else {
        return client_from_env().await;
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| KubeSourceError::Client(kube::Error::InferKubeconfig(e)))?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| KubeSourceError::Client(kube::Error::InferKubeconfig(e)))?;
    kube::Client::try_from(config).map_err(KubeSourceError::Client)
}

/// Starts [`run`] on a task of its own.
pub fn spawn(
    client: kube::Client,
    config: KubeSourceConfig,
    tx: watch::Sender<ManifestState>,
) -> JoinHandle<Result<(), KubeSourceError>> {
    tokio::spawn(run(client, config, tx))
}

/// Watches the cluster through `client` and publishes on `tx` as described in the module
/// documentation. Runs until every receiver of `tx` is gone (then `Ok`); fails at once
/// without a node name.
pub async fn run(
    client: kube::Client,
    config: KubeSourceConfig,
    tx: watch::Sender<ManifestState>,
) -> Result<(), KubeSourceError> {
    let node = config.node_name.trim();
    if node.is_empty() {
        return Err(KubeSourceError::NoNodeName);
    }
    let (opened_tx, opened_rx) = mpsc::unbounded();
    let mesh_config_path = config.mesh_config.as_ref().map(mesh_config_path);
    let client = observed(client, opened_tx, mesh_config_path);

    let watch_config = watcher::Config::default();
    let streams: Vec<BoxStream<'static, Msg>> = vec![
        watch_stream(&client, watch_config.clone(), |r| {
            Msg::Namespace(Box::new(r))
        }),
        watch_stream(&client, watch_config.clone(), |r| Msg::Pod(Box::new(r))),
        watch_stream(&client, watch_config.clone(), |r| Msg::Service(Box::new(r))),
        watch_stream(&client, watch_config.clone(), |r| Msg::Slice(Box::new(r))),
        opened_rx.map(Msg::WatchOpened).boxed(),
    ]
    .into_iter()
    .chain(RoutingKind::ALL.into_iter().map(|kind| {
        let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &kind.resource());
        watcher(api, watch_config.clone())
            .default_backoff()
            .map(move |r| Msg::Routing(kind, Box::new(r)))
            .boxed()
    }))
    .chain(config.mesh_config.iter().map(|name| {
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), &name.namespace, &mesh_config_resource());
        let selector = format!("metadata.name={}", name.name);
        watcher(api, watch_config.clone().fields(&selector))
            .default_backoff()
            .map(|r| Msg::MeshConfig(Box::new(r)))
            .boxed()
    }))
    .collect();
    let mut messages = stream::select_all(streams);
    info!(node, "watching the Kubernetes API server");

    let mut state = State {
        mesh_config: MeshConfigStore {
            name: config.mesh_config.clone(),
            ..MeshConfigStore::default()
        },
        ..State::default()
    };
    loop {
        let msg = tokio::select! {
            msg = messages.next() => msg,
            () = tx.closed() => return Ok(()),
        };
        let Some(msg) = msg else {
            // The watchers never end; all of them at once means the runtime is going away.
            return Ok(());
        };
        state.handle(msg);
        // Take in whatever else is already there before building a model: a list or a
        // burst of events becomes one generation (bounded, so a steady stream of events
        // still gets published).
        for _ in 0..MAX_BATCH {
            match messages.next().now_or_never() {
                Some(Some(msg)) => state.handle(msg),
                _ => break,
            }
        }
        state.publish(&tx);
    }
}

/// The most messages taken in before the model is rebuilt and published.
const MAX_BATCH: usize = 4096;

fn watch_stream<K>(
    client: &kube::Client,
    config: watcher::Config,
    wrap: fn(WatchResult<K>) -> Msg,
) -> BoxStream<'static, Msg>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug + Send + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    watcher(api, config).default_backoff().map(wrap).boxed()
}

type WatchResult<K> = Result<watcher::Event<K>, watcher::Error>;

/// The kinds the source watches, in the order errors are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
    Routing(RoutingKind),
    /// FSM's MeshConfig object, when one is watched.
    MeshConfig,
}

impl Kind {
    /// The four core kinds.
    const CORE: [Kind; 4] = [
        Kind::Namespaces,
        Kind::Pods,
        Kind::Services,
        Kind::EndpointSlices,
    ];

    fn all() -> impl Iterator<Item = Kind> {
        Kind::CORE
            .into_iter()
            .chain(RoutingKind::ALL.into_iter().map(Kind::Routing))
    }

    /// The collection's path on the API server, as kube-rs requests it.
    fn path(self) -> &'static str {
        match self {
            Kind::Namespaces => "/api/v1/namespaces",
            Kind::Pods => "/api/v1/pods",
            Kind::Services => "/api/v1/services",
            Kind::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Routing(kind) => kind.path(),
            // Watched in one namespace; `Observed` knows that path.
            Kind::MeshConfig => "/apis/config.flomesh.io/v1alpha3/meshconfigs",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::Routing(kind) => kind.name(),
            Kind::MeshConfig => "meshconfigs.config.flomesh.io",
        })
    }
}

enum Msg {
    // Boxed: a Pod is large, and the messages wait in queues.
    Namespace(Box<WatchResult<k8s::Namespace>>),
    Pod(Box<WatchResult<k8s::Pod>>),
    Service(Box<WatchResult<k8s::Service>>),
    Slice(Box<WatchResult<discovery::EndpointSlice>>),
    Routing(RoutingKind, Box<WatchResult<kube::api::DynamicObject>>),
    MeshConfig(Box<WatchResult<kube::api::DynamicObject>>),
    /// The API server answered a watch request of this kind with success.
    WatchOpened(Kind),
}

/// `client`, reporting each watch request the API server accepts on `opened`. The watcher
/// says nothing when it resumes a watch after an error; this is how the source learns that
/// the watch recovered.
fn observed(
    client: kube::Client,
    opened: mpsc::UnboundedSender<Kind>,
    mesh_config_path: Option<String>,
) -> kube::Client {
    let namespace = client.default_namespace().to_string();
    kube::Client::new(
        Observed {
            inner: client,
            opened,
            mesh_config_path,
        },
        namespace,
    )
}

#[derive(Clone)]
struct Observed {
    inner: kube::Client,
    opened: mpsc::UnboundedSender<Kind>,
    /// The MeshConfig collection in its namespace, when one is watched.
    mesh_config_path: Option<String>,
}

impl tower_service::Service<http::Request<kube::client::Body>> for Observed {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = BoxFuture<'static, Result<Self::Response, kube::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let is_watch = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|pair| pair == "watch=true"));
        let path = request.uri().path();
        let kind = Kind::all()
            .find(|kind| kind.path() == path)
            .or_else(|| {
                (self.mesh_config_path.as_deref() == Some(path)).then_some(Kind::MeshConfig)
            })
            .filter(|_| is_watch);
        let client = self.inner.clone();
        let opened = self.opened.clone();
        Box::pin(async move {
            let response = client.send(request).await?;
            if let Some(kind) = kind.filter(|_| response.status().is_success()) {
                // Only fails when the source is gone.
                let _ = opened.unbounded_send(kind);
            }
            Ok(response)
        })
    }
}

/// The converted objects of one kind, keyed by `namespace/name` (or name).
struct Store<T> {
    items: BTreeMap<String, T>,
    /// Filled during a list; replaces `items` when the list completes.
    relist: Option<BTreeMap<String, T>>,
    /// Whether a list has completed at least once.
    synced: bool,
    /// Objects left out because they do not convert, with the reason (logged once).
    rejected: BTreeMap<String, String>,
    /// The keys rejected during the list under way.
    relist_rejected: BTreeSet<String>,
    /// Policy objects: an update that does not convert leaves the previous version in
    /// force instead of taking the object out (a pod's stale address would mislead, a
    /// policy's last valid version is what its author had in force).
    keeps_previous: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            relist: None,
            synced: false,
            rejected: BTreeMap::new(),
            relist_rejected: BTreeSet::new(),
            keeps_previous: false,
        }
    }
}

/// What one event changed in a store: the keys whose object changed, each with its new
/// version or `None` when it is gone. `None` when nothing changed; an empty list when only
/// the first list completed (empty).
type Changes<T> = Option<Vec<(String, Option<T>)>>;

impl<T: PartialEq + Clone> Store<T> {
    /// Applies one watcher event; returns what changed in the live objects.
    fn apply<O: Resource>(
        &mut self,
        kind: Kind,
        event: watcher::Event<O>,
        convert: impl Fn(O) -> Result<T, ObjectError>,
    ) -> Changes<T> {
        match event {
            watcher::Event::Init => {
                debug!(%kind, "listing");
                self.relist = Some(BTreeMap::new());
                self.relist_rejected.clear();
                None
            }
            watcher::Event::InitApply(obj) => {
                let key = object_key(&obj);
                let item = self.convert(kind, &key, obj, &convert);
                let item = match item {
                    Some(item) => Some(item),
                    None => {
                        self.relist_rejected.insert(key.clone());
                        self.previous(&key)
                    }
                };
                if let Some(item) = item {
                    self.relist.get_or_insert_default().insert(key, item);
                }
                None
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let seen = std::mem::take(&mut self.relist_rejected);
                self.rejected.retain(|key, _| seen.contains(key));
                debug!(%kind, objects = listed.len(), "listed");
                // What the list changed: O(objects), once per list.
                let mut changes: Vec<(String, Option<T>)> = self
                    .items
                    .keys()
                    .filter(|key| !listed.contains_key(*key))
                    .map(|key| (key.clone(), None))
                    .collect();
                changes.extend(
                    listed
                        .iter()
                        .filter(|(key, item)| self.items.get(*key) != Some(item))
                        .map(|(key, item)| (key.clone(), Some(item.clone()))),
                );
                let first = !self.synced;
                self.items = listed;
                self.synced = true;
                (first || !changes.is_empty()).then_some(changes)
            }
            watcher::Event::Apply(obj) => {
                let key = object_key(&obj);
                match self.convert(kind, &key, obj, &convert) {
                    Some(item) if self.items.get(&key) == Some(&item) => None,
                    Some(item) => {
                        self.items.insert(key.clone(), item.clone());
                        Some(vec![(key, Some(item))])
                    }
                    // It was valid before and is not any more: out of the model it goes,
                    // unless its previous version stays.
                    None if self.keeps_previous => None,
                    None => self.remove(key),
                }
            }
            watcher::Event::Delete(obj) => {
                let key = object_key(&obj);
                self.rejected.remove(&key);
                self.remove(key)
            }
        }
    }

    /// Take `key` out; a change if it was there.
    fn remove(&mut self, key: String) -> Changes<T> {
        self.items.remove(&key)?;
        Some(vec![(key, None)])
    }

    /// The version of `key` in force, when an object that fails to convert keeps it.
    fn previous(&self, key: &str) -> Option<T>
    where
        T: Clone,
    {
        self.items.get(key).filter(|_| self.keeps_previous).cloned()
    }

    /// `obj` converted, or `None` with a warning when it cannot be (once per reason).
    fn convert<O>(
        &mut self,
        kind: Kind,
        key: &str,
        obj: O,
        convert: &impl Fn(O) -> Result<T, ObjectError>,
    ) -> Option<T> {
        match convert(obj) {
            Ok(item) => {
                if self.rejected.remove(key).is_some() {
                    info!(%kind, object = key, "object converts again, back in the model");
                }
                Some(item)
            }
            Err(err) => {
                let reason = err.to_string();
                if self.rejected.get(key) != Some(&reason) {
                    if self.keeps_previous && self.items.contains_key(key) {
                        warn!(%kind, object = key, "update does not convert, the previous version stays: {reason}");
                    } else {
                        warn!(%kind, object = key, "object left out of the model: {reason}");
                    }
                    self.rejected.insert(key.to_string(), reason);
                }
                None
            }
        }
    }
}

fn object_key<O: Resource>(obj: &O) -> String {
    match obj.meta().namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}", obj.meta().name.as_deref().unwrap_or("")),
        _ => obj.meta().name.clone().unwrap_or_default(),
    }
}

/// The watched MeshConfig object.
#[derive(Default)]
struct MeshConfigStore {
    /// Which one; `None` when none is watched.
    name: Option<MeshConfigName>,
    /// Whether a list completed (or cannot: no CRD, forbidden).
    synced: bool,
    /// What is in force: its last valid version, or none.
    object: MeshConfigObject,
    /// During a list: whether it held the object.
    listing: Option<bool>,
    /// Why the object's current version is rejected (published in `last_error`).
    rejected: Option<String>,
}

impl MeshConfigStore {
    fn apply(&mut self, event: watcher::Event<kube::api::DynamicObject>) {
        match event {
            watcher::Event::Init => self.listing = Some(false),
            watcher::Event::InitApply(obj) => {
                self.listing = Some(true);
                self.update(&obj);
            }
            watcher::Event::Apply(obj) => self.update(&obj),
            watcher::Event::InitDone => {
                if self.listing.take() == Some(false) {
                    self.gone();
                }
                self.synced = true;
            }
            watcher::Event::Delete(_) => self.gone(),
        }
    }

    fn gone(&mut self) {
        if self.object != MeshConfigObject::Absent {
            info!("no MeshConfig object: the mesh config file alone applies");
        }
        self.object = MeshConfigObject::Absent;
        self.rejected = None;
    }

    /// A new version of the object: in force if it validates, else reported while the
    /// previous one stays.
    fn update(&mut self, obj: &kube::api::DynamicObject) {
        let name = object_key(obj);
        let spec = obj.data.get("spec").unwrap_or(&serde_json::Value::Null);
        match TrafficSettings::from_spec(spec) {
            Ok((settings, warnings)) => {
                if self.rejected.take().is_some() {
                    info!(object = name, "MeshConfig valid again");
                }
                let object = MeshConfigObject::Present {
                    name,
                    settings,
                    warnings,
                };
                if self.object != object {
                    // The merged configuration is logged where it is applied.
                    debug!("MeshConfig changed: {object:?}");
                    self.object = object;
                }
            }
            Err(reason) => {
                let message = format!(
                    "MeshConfig {name} rejected, {}: {reason}",
                    match self.object {
                        MeshConfigObject::Present { .. } => "its previous version stays",
                        _ => "the mesh config file alone applies",
                    }
                );
                if self.rejected.as_ref() != Some(&message) {
                    warn!("{message}");
                    self.rejected = Some(message);
                }
                if self.object == MeshConfigObject::Unknown {
                    self.object = MeshConfigObject::Absent;
                }
            }
        }
    }
}

/// The MeshConfig CRD at the version the agent reads: the one FSM stores.
fn mesh_config_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "config.flomesh.io".into(),
        version: "v1alpha3".into(),
        api_version: "config.flomesh.io/v1alpha3".into(),
        kind: "MeshConfig".into(),
        plural: "meshconfigs".into(),
    }
}

/// The collection's path for the object `name`, as kube-rs requests it.
fn mesh_config_path(name: &MeshConfigName) -> String {
    format!(
        "/apis/config.flomesh.io/v1alpha3/namespaces/{}/meshconfigs",
        name.namespace
    )
}

struct State {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<Slice>,
    routing: BTreeMap<RoutingKind, Store<RoutingObject>>,
    /// Routing CRDs the API server does not have (404), logged once.
    absent: BTreeSet<RoutingKind>,
    /// The error of each failing watch, as published.
    errors: BTreeMap<Kind, String>,
    /// The model of the live objects, kept current event by event (see [`State::handle`])
    /// in persistent maps, so publishing it is a cheap clone; its routing objects are
    /// rebuilt only when one of them changed.
    model: Model,
    /// The Service each slice belongs to, and the slices of each Service (in key order:
    /// the order their ports are merged in).
    slice_service: BTreeMap<String, ServiceKey>,
    slices_of: BTreeMap<ServiceKey, BTreeSet<String>>,
    /// Whether the objects changed since the model was last published.
    dirty: bool,
    /// Whether a routing object changed since the model's routing objects were built.
    routing_dirty: bool,
    mesh_config: MeshConfigStore,
}

impl Default for State {
    fn default() -> Self {
        Self {
            namespaces: Store::default(),
            pods: Store::default(),
            services: Store::default(),
            slices: Store::default(),
            routing: RoutingKind::ALL
                .into_iter()
                .map(|kind| {
                    let store = Store {
                        keeps_previous: true,
                        ..Store::default()
                    };
                    (kind, store)
                })
                .collect(),
            absent: BTreeSet::new(),
            errors: BTreeMap::new(),
            model: Model::default(),
            slice_service: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            dirty: false,
            routing_dirty: false,
            mesh_config: MeshConfigStore::default(),
        }
    }
}

impl State {
    /// Take in one message and apply what it changed to the model: O(change · log n),
    /// not O(cluster).
    fn handle(&mut self, msg: Msg) {
        let changed = match msg {
            Msg::WatchOpened(kind) => {
                self.recovered(kind);
                false
            }
            Msg::Namespace(r) => {
                let changes = self.event(
                    Kind::Namespaces,
                    *r,
                    |s| &mut s.namespaces,
                    objects::namespace,
                );
                for (key, namespace) in changes.iter().flatten() {
                    match namespace {
                        Some(namespace) => {
                            self.model.namespaces.insert(key.clone(), namespace.clone())
                        }
                        None => self.model.namespaces.remove(key),
                    };
                }
                changes.is_some()
            }
            Msg::Pod(r) => {
                let changes = self.event(Kind::Pods, *r, |s| &mut s.pods, objects::pod);
                for (key, pod) in changes.iter().flatten() {
                    match pod {
                        Some(pod) => drop(self.model.pods.insert(pod.key(), pod.clone())),
                        None => {
                            if let Ok(key) = key.parse::<PodKey>() {
                                self.model.pods.remove(&key);
                            }
                        }
                    }
                }
                changes.is_some()
            }
            Msg::Service(r) => {
                let changes = self.event(Kind::Services, *r, |s| &mut s.services, objects::service);
                for (key, service) in changes.iter().flatten() {
                    match service {
                        Some(service) => {
                            let key = service.key();
                            self.model.services.insert(key.clone(), service.clone());
                            self.merge_slices(&key);
                        }
                        None => {
                            if let Ok(key) = key.parse::<ServiceKey>() {
                                self.model.services.remove(&key);
                                self.model.endpoint_slices.remove(&key);
                            }
                        }
                    }
                }
                changes.is_some()
            }
            Msg::Slice(r) => {
                let changes = self.event(
                    Kind::EndpointSlices,
                    *r,
                    |s| &mut s.slices,
                    objects::endpoint_slice,
                );
                for (key, slice) in changes.iter().flatten() {
                    self.slice_changed(key, slice.as_ref());
                }
                changes.is_some()
            }
            Msg::Routing(kind, r) => {
                let changed = self.routing_event(kind, *r);
                self.routing_dirty |= changed;
                changed
            }
            Msg::MeshConfig(r) => {
                self.mesh_config_event(*r);
                // Not the model: published beside it.
                false
            }
        };
        self.dirty |= changed;
    }

    /// Slice `key` is now `slice` (`None`: gone): re-merge the slices of the Service it
    /// belonged to and of the one it belongs to now.
    fn slice_changed(&mut self, key: &str, slice: Option<&Slice>) {
        let before = self.slice_service.remove(key);
        if let Some(service) = &before {
            if let Some(keys) = self.slices_of.get_mut(service) {
                keys.remove(key);
                if keys.is_empty() {
                    self.slices_of.remove(service);
                }
            }
        }
        let after = slice.and_then(|slice| slice.service.clone());
        if let Some(service) = &after {
            self.slice_service.insert(key.to_owned(), service.clone());
            self.slices_of
                .entry(service.clone())
                .or_default()
                .insert(key.to_owned());
        }
        let moved = after.iter().filter(|s| Some(*s) != before.as_ref());
        for service in before.iter().chain(moved) {
            self.merge_slices(service);
        }
    }

    /// The endpoint ports of `service` from all its slices, in slice key order. Every
    /// Service has an entry, so that the selector (which ignores readiness) is never the
    /// answer; slices of unknown Services are left out.
    fn merge_slices(&mut self, service: &ServiceKey) {
        if !self.model.services.contains_key(service) {
            self.model.endpoint_slices.remove(service);
            return;
        }
        let ports: Vec<SlicePort> = self
            .slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| self.slices.items.get(key))
            .flat_map(|slice| slice.ports.iter().cloned())
            .collect();
        self.model.endpoint_slices.insert(service.clone(), ports);
    }

    /// A routing CRD's event; a 404 means the cluster lacks the CRD: listed, empty.
    fn routing_event(
        &mut self,
        kind: RoutingKind,
        result: WatchResult<kube::api::DynamicObject>,
    ) -> bool {
        let missing = matches!(
            &result,
            Err(watcher::Error::InitialListFailed(kube::Error::Api(response)))
                if response.code == 404
        );
        if missing {
            self.recovered(Kind::Routing(kind));
            if self.absent.insert(kind) {
                info!(
                    kind = kind.name(),
                    "not installed in this cluster: none of them"
                );
            }
            let store = self
                .routing
                .get_mut(&kind)
                .expect("every routing kind has a store");
            let had = !store.items.is_empty();
            store.items.clear();
            let first = !store.synced;
            store.synced = true;
            return had || first;
        }
        if result.is_ok() {
            self.absent.remove(&kind);
        }
        // Not allowed to list it (RBAC without the CRD's rules): the error is published,
        // and the rest of the model must not wait for a list that will not come.
        let forbidden = matches!(
            &result,
            Err(watcher::Error::InitialListFailed(kube::Error::Api(response)))
                if response.code == 403
        );
        let store = self
            .routing
            .get_mut(&kind)
            .expect("every routing kind has a store");
        let first = forbidden && !store.synced;
        if forbidden {
            store.synced = true;
        }
        first
            | self
                .event(
                    Kind::Routing(kind),
                    result,
                    |s| {
                        s.routing
                            .get_mut(&kind)
                            .expect("every routing kind has a store")
                    },
                    move |obj| routing::convert(kind, obj),
                )
                .is_some()
    }

    /// The MeshConfig watch's event; a 404 means the cluster lacks the CRD: no object.
    fn mesh_config_event(&mut self, result: WatchResult<kube::api::DynamicObject>) {
        let status = match &result {
            Err(watcher::Error::InitialListFailed(kube::Error::Api(response))) => {
                Some(response.code)
            }
            _ => None,
        };
        match (status, result) {
            (Some(404), _) => {
                self.recovered(Kind::MeshConfig);
                let store = &mut self.mesh_config;
                if store.object != MeshConfigObject::Absent {
                    info!("no MeshConfig CRD in this cluster: the mesh config file alone applies");
                }
                store.object = MeshConfigObject::Absent;
                store.rejected = None;
                store.synced = true;
            }
            (_, Err(err)) => {
                // Not allowed to list it: reported, and the model does not wait for it.
                if status == Some(403) {
                    let store = &mut self.mesh_config;
                    store.synced = true;
                    if store.object == MeshConfigObject::Unknown {
                        store.object = MeshConfigObject::Absent;
                    }
                }
                self.failed(Kind::MeshConfig, &err);
            }
            (_, Ok(event)) => {
                if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    self.recovered(Kind::MeshConfig);
                }
                self.mesh_config.apply(event);
            }
        }
    }

    fn event<O: Resource, T: PartialEq + Clone>(
        &mut self,
        kind: Kind,
        result: WatchResult<O>,
        store: impl FnOnce(&mut State) -> &mut Store<T>,
        convert: impl Fn(O) -> Result<T, ObjectError>,
    ) -> Changes<T> {
        match result {
            Ok(event) => {
                // `Init` and `InitApply` only say that a list started or is under way.
                if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    self.recovered(kind);
                }
                let changes = store(self).apply(kind, event, convert);
                if changes.is_some() {
                    debug!(%kind, "objects changed");
                }
                changes
            }
            Err(err) => {
                self.failed(kind, &err);
                None
            }
        }
    }

    /// The watch of `kind` failed: published (and logged once) until it recovers.
    fn failed(&mut self, kind: Kind, err: &watcher::Error) {
        let message = format!("watch {kind}: {err}");
        if self.errors.get(&kind) != Some(&message) {
            warn!(%kind, "{message}; keeping the last model, retrying");
            self.errors.insert(kind, message);
        }
    }

    fn recovered(&mut self, kind: Kind) {
        if let Some(error) = self.errors.remove(&kind) {
            info!(%kind, "watch recovered (was: {error})");
        }
    }

    fn synced(&self) -> bool {
        self.namespaces.synced
            && self.pods.synced
            && self.services.synced
            && self.slices.synced
            && self.routing.values().all(|store| store.synced)
            && (self.mesh_config.name.is_none() || self.mesh_config.synced)
    }

    /// The model to publish: the one kept current, with its routing objects rebuilt if
    /// one of them changed (they are few; the rest is shared with the last model).
    fn build(&mut self) -> Model {
        if std::mem::take(&mut self.routing_dirty) {
            let mut routing = RoutingObjects::default();
            for store in self.routing.values() {
                for object in store.items.values() {
                    object.clone().insert_into(&mut routing);
                }
            }
            self.model.routing = Arc::new(routing);
        }
        self.model.clone()
    }

    fn error_text(&self) -> Option<String> {
        let mut errors: Vec<&str> = self.errors.values().map(String::as_str).collect();
        errors.extend(self.mesh_config.rejected.as_deref());
        if errors.is_empty() {
            return None;
        }
        Some(errors.join("; "))
    }

    fn publish(&mut self, tx: &watch::Sender<ManifestState>) {
        let last_error = self.error_text();
        let model = if self.dirty && self.synced() {
            self.dirty = false;
            Some(self.build())
        } else {
            None
        };
        let mesh_config = &self.mesh_config.object;
        tx.send_if_modified(|state| {
            let mut changed = false;
            if state.mesh_config != *mesh_config {
                state.mesh_config = mesh_config.clone();
                changed = true;
            }
            if state.last_error != last_error {
                state.last_error = last_error;
                changed = true;
            }
            // `dirty` comes from comparing each changed object with its previous version,
            // so the model is not compared as a whole.
            if let Some(model) = model {
                state.generation += 1;
                info!(
                    generation = state.generation,
                    namespaces = model.namespaces.len(),
                    pods = model.pods.len(),
                    services = model.services.len(),
                    endpoint_slices = self.slices.items.len(),
                    "new model from the API server"
                );
                state.model = Arc::new(model);
                changed = true;
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(name: &str, service: &str, ip: &str) -> discovery::EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "demo",
                "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"port": 9000, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        }))
        .unwrap()
    }

    fn service(name: &str) -> k8s::Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 9000}]},
        }))
        .unwrap()
    }

    fn pod(name: &str, app: &str) -> k8s::Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "demo", "labels": {"app": app}},
            "spec": {"containers": [{"name": "main"}]},
        }))
        .unwrap()
    }

    /// The model from scratch, the way it was built before it was kept current.
    fn rebuilt(state: &State) -> Model {
        let mut model = Model::default();
        for ns in state.namespaces.items.values() {
            model.namespaces.insert(ns.name.clone(), ns.clone());
        }
        for pod in state.pods.items.values() {
            model.pods.insert(pod.key(), pod.clone());
        }
        for svc in state.services.items.values() {
            model.services.insert(svc.key(), svc.clone());
            model.endpoint_slices.insert(svc.key(), Vec::new());
        }
        for slice in state.slices.items.values() {
            let ports = slice
                .service
                .as_ref()
                .and_then(|svc| model.endpoint_slices.get_mut(svc));
            if let Some(ports) = ports {
                ports.extend(slice.ports.iter().cloned());
            }
        }
        let mut routing = RoutingObjects::default();
        for store in state.routing.values() {
            for object in store.items.values() {
                object.clone().insert_into(&mut routing);
            }
        }
        model.routing = Arc::new(routing);
        model
    }

    /// Every event changes the kept model exactly as a rebuild from all objects would:
    /// slices that arrive before their Service, move to another Service, go; a Service
    /// that goes and comes back; a pod relabelled and deleted; a relist that drops one.
    #[test]
    fn the_kept_model_always_equals_a_rebuild() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut state = State::default();
        let mut steps: Vec<Msg> = vec![
            Msg::Service(Box::new(Ok(Init))),
            Msg::Service(Box::new(Ok(InitApply(service("a"))))),
            Msg::Service(Box::new(Ok(InitDone))),
            Msg::Slice(Box::new(Ok(Apply(slice("b-1", "b", "10.244.0.7"))))),
            Msg::Slice(Box::new(Ok(Apply(slice("a-2", "a", "10.244.0.6"))))),
            Msg::Slice(Box::new(Ok(Apply(slice("a-1", "a", "10.244.0.5"))))),
            Msg::Service(Box::new(Ok(Apply(service("b"))))),
            Msg::Slice(Box::new(Ok(Apply(slice("a-2", "b", "10.244.0.8"))))),
            Msg::Service(Box::new(Ok(Delete(service("a"))))),
            Msg::Service(Box::new(Ok(Apply(service("a"))))),
            Msg::Slice(Box::new(Ok(Delete(slice("b-1", "b", "10.244.0.7"))))),
            Msg::Pod(Box::new(Ok(Apply(pod("p", "a"))))),
            Msg::Pod(Box::new(Ok(Apply(pod("p", "b"))))),
            Msg::Pod(Box::new(Ok(Apply(pod("q", "b"))))),
            Msg::Pod(Box::new(Ok(Delete(pod("p", "b"))))),
            Msg::Slice(Box::new(Ok(Init))),
            Msg::Slice(Box::new(Ok(InitApply(slice("a-1", "a", "10.244.0.9"))))),
            Msg::Slice(Box::new(Ok(InitDone))),
        ];
        for (i, msg) in steps.drain(..).enumerate() {
            state.handle(msg);
            assert_eq!(state.build(), rebuilt(&state), "after step {i}");
        }
        let model = state.build();
        let a = ServiceKey::new("demo", "a");
        assert_eq!(
            model.endpoint_slices[&a][0].endpoints[0].ip.to_string(),
            "10.244.0.9"
        );
        assert!(model.endpoint_slices[&ServiceKey::new("demo", "b")].is_empty());
        assert_eq!(
            model
                .pods
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["demo/q"]
        );
    }
}
