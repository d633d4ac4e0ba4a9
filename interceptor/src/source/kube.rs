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
//! Objects are converted by the functions of the manifest source (`*_from_api`), so the
//! model is the one a directory of the same objects would give, with one addition: every
//! Service gets an entry in [`Model::endpoint_slices`], empty until its slices arrive, so
//! that endpoints come from the slices only and never from the selector (slices say which
//! endpoints are ready; the selector does not). An object the
//! conversion rejects (an IPv6 `podIP`, a port out of range) is left out of the model with
//! a warning naming it, the field and the value.
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

use super::manifests::{self, ManifestError, ManifestState, Slice};
use crate::model::{Model, Namespace, Pod, Service};

mod routing;
use crate::model::routing::RoutingObject;
use routing::RoutingKind;

/// What the Kubernetes source needs besides a client.
#[derive(Clone, Debug, Default)]
pub struct KubeSourceConfig {
    /// The node the agent runs on (the DaemonSet passes `spec.nodeName` as `NODE_NAME`),
    /// named in its logs.
    pub node_name: String,
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
    let client = observed(client, opened_tx);

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
    .collect();
    let mut messages = stream::select_all(streams);
    info!(node, "watching the Kubernetes API server");

    let mut state = State::default();
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
    /// The API server answered a watch request of this kind with success.
    WatchOpened(Kind),
}

/// `client`, reporting each watch request the API server accepts on `opened`. The watcher
/// says nothing when it resumes a watch after an error; this is how the source learns that
/// the watch recovered.
fn observed(client: kube::Client, opened: mpsc::UnboundedSender<Kind>) -> kube::Client {
    let namespace = client.default_namespace().to_string();
    kube::Client::new(
        Observed {
            inner: client,
            opened,
        },
        namespace,
    )
}

#[derive(Clone)]
struct Observed {
    inner: kube::Client,
    opened: mpsc::UnboundedSender<Kind>,
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
        let kind = Kind::all().find(|kind| is_watch && kind.path() == path);
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

impl<T: PartialEq + Clone> Store<T> {
    /// Applies one watcher event; returns whether the live objects changed.
    fn apply<O: Resource>(
        &mut self,
        kind: Kind,
        event: watcher::Event<O>,
        convert: impl Fn(O) -> Result<T, ManifestError>,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                debug!(%kind, "listing");
                self.relist = Some(BTreeMap::new());
                self.relist_rejected.clear();
                false
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
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let seen = std::mem::take(&mut self.relist_rejected);
                self.rejected.retain(|key, _| seen.contains(key));
                debug!(%kind, objects = listed.len(), "listed");
                let changed = !self.synced || self.items != listed;
                self.items = listed;
                self.synced = true;
                changed
            }
            watcher::Event::Apply(obj) => {
                let key = object_key(&obj);
                match self.convert(kind, &key, obj, &convert) {
                    Some(item) if self.items.get(&key) == Some(&item) => false,
                    Some(item) => {
                        self.items.insert(key, item);
                        true
                    }
                    // It was valid before and is not any more: out of the model it goes,
                    // unless its previous version stays.
                    None if self.keeps_previous => false,
                    None => self.items.remove(&key).is_some(),
                }
            }
            watcher::Event::Delete(obj) => {
                let key = object_key(&obj);
                self.rejected.remove(&key);
                self.items.remove(&key).is_some()
            }
        }
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
        convert: &impl Fn(O) -> Result<T, ManifestError>,
    ) -> Option<T> {
        match convert(obj) {
            Ok(item) => {
                if self.rejected.remove(key).is_some() {
                    info!(%kind, object = key, "object converts again, back in the model");
                }
                Some(item)
            }
            Err(err) => {
                let reason = describe(&err);
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

/// A conversion error without the stand-in file name of the manifest source.
fn describe(err: &ManifestError) -> String {
    match err {
        ManifestError::InvalidValue {
            object,
            field,
            message,
            ..
        } => format!("{object}: {field}: {message}"),
        other => other.to_string(),
    }
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
    /// Whether the objects changed since the last model was built.
    dirty: bool,
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
            dirty: false,
        }
    }
}

impl State {
    fn handle(&mut self, msg: Msg) {
        let changed = match msg {
            Msg::WatchOpened(kind) => {
                self.recovered(kind);
                false
            }
            Msg::Namespace(r) => self.event(
                Kind::Namespaces,
                *r,
                |s| &mut s.namespaces,
                manifests::namespace_from_api,
            ),
            Msg::Pod(r) => self.event(Kind::Pods, *r, |s| &mut s.pods, manifests::pod_from_api),
            Msg::Service(r) => self.event(
                Kind::Services,
                *r,
                |s| &mut s.services,
                manifests::service_from_api,
            ),
            Msg::Slice(r) => self.event(
                Kind::EndpointSlices,
                *r,
                |s| &mut s.slices,
                manifests::endpoint_slice_from_api,
            ),
            Msg::Routing(kind, r) => self.routing_event(kind, *r),
        };
        self.dirty |= changed;
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
            | self.event(
                Kind::Routing(kind),
                result,
                |s| {
                    s.routing
                        .get_mut(&kind)
                        .expect("every routing kind has a store")
                },
                move |obj| routing::convert(kind, obj),
            )
    }

    fn event<O: Resource, T: PartialEq + Clone>(
        &mut self,
        kind: Kind,
        result: WatchResult<O>,
        store: impl FnOnce(&mut State) -> &mut Store<T>,
        convert: impl Fn(O) -> Result<T, ManifestError>,
    ) -> bool {
        match result {
            Ok(event) => {
                // `Init` and `InitApply` only say that a list started or is under way.
                if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    self.recovered(kind);
                }
                let changed = store(self).apply(kind, event, convert);
                if changed {
                    debug!(%kind, "objects changed");
                }
                changed
            }
            Err(err) => {
                let message = format!("watch {kind}: {err}");
                if self.errors.get(&kind) != Some(&message) {
                    warn!(%kind, "{message}; keeping the last model, retrying");
                    self.errors.insert(kind, message);
                }
                false
            }
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
    }

    fn build(&self) -> Model {
        let mut model = Model {
            namespaces: self
                .namespaces
                .items
                .values()
                .map(|ns| (ns.name.clone(), ns.clone()))
                .collect(),
            pods: self
                .pods
                .items
                .values()
                .map(|pod| (pod.key(), pod.clone()))
                .collect(),
            services: self
                .services
                .items
                .values()
                .map(|svc| (svc.key(), svc.clone()))
                .collect(),
            ..Model::default()
        };
        // Every service has an entry, so that the selector (which ignores readiness) is
        // never the answer; slices of unknown services are left out.
        model.endpoint_slices = model
            .services
            .keys()
            .map(|key| (key.clone(), Vec::new()))
            .collect();
        for slice in self.slices.items.values() {
            if let Some(ports) = slice
                .service
                .as_ref()
                .and_then(|svc| model.endpoint_slices.get_mut(svc))
            {
                ports.extend(slice.ports.iter().cloned());
            }
        }
        for store in self.routing.values() {
            for object in store.items.values() {
                object.clone().insert_into(&mut model.routing);
            }
        }
        model
    }

    fn error_text(&self) -> Option<String> {
        if self.errors.is_empty() {
            return None;
        }
        let errors: Vec<&str> = self.errors.values().map(String::as_str).collect();
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
        tx.send_if_modified(|state| {
            let mut changed = false;
            if state.last_error != last_error {
                state.last_error = last_error;
                changed = true;
            }
            if let Some(model) = model {
                if state.generation == 0 || *state.model != model {
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
            }
            changed
        });
    }
}
