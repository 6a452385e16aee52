//! Channels: `join` / `leave` / `broadcast` with presence, on every node of a deployment.
//!
//! A node keeps its own members (with their outboxes) and, from the other nodes' messages,
//! theirs. Nodes talk through the database ([`crate::store::EventStore::send_to_nodes`]:
//! PostgreSQL `NOTIFY`, large bodies fetched by id; SQLite has no other nodes): joins, leaves,
//! broadcasts, a heartbeat every third of `realtime.presence_timeout_secs`, and on start or
//! after losing the listening connection a `sync` request that every node answers with its
//! whole presence. A node not heard from for `presence_timeout_secs` is gone: its members
//! leave, and local members are told.
//!
//! Who may join and broadcast is a CEL rule over `auth` and `channel`
//! (`realtime.channels.join` / `.broadcast`); without one only admins and service keys may.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Outbox;
use crate::auth::Caller;
use crate::config::RealtimeConfig;
use crate::rules::Rule;
use crate::store::Store;

/// A presence entry as clients see it.
fn entry(key: &str, caller: &Caller, presence: &Value) -> Value {
    let uid = match caller {
        Caller::User(c) => Some(c.sub.clone()),
        _ => None,
    };
    json!({"key": key, "uid": uid, "presence": presence})
}

struct Member {
    outbox: Outbox,
    entry: Value,
}

struct RemoteNode {
    seen: Instant,
    /// channel → key → entry
    channels: HashMap<String, BTreeMap<String, Value>>,
}

#[derive(Default)]
struct State {
    local: HashMap<String, BTreeMap<String, Member>>,
    remote: HashMap<String, RemoteNode>,
}

/// What nodes tell each other.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum NodeMessage {
    Join {
        n: String,
        c: String,
        e: Value,
    },
    Leave {
        n: String,
        c: String,
        k: String,
    },
    /// `m`: the broadcast frame, as local members receive it.
    Broadcast {
        n: String,
        c: String,
        m: String,
    },
    Heartbeat {
        n: String,
    },
    Sync {
        n: String,
    },
    /// A node's whole presence: channel → entries.
    State {
        n: String,
        s: HashMap<String, Vec<Value>>,
    },
    Bye {
        n: String,
    },
}

/// Messages for other nodes waiting to be sent; past it they are dropped (and counted).
const NODE_QUEUE: usize = 10_000;

pub(crate) struct Channels {
    node: String,
    store: Arc<dyn Store>,
    /// Messages for the other nodes, sent one at a time by [`Channels::run`] (a burst of
    /// broadcasts must not become a burst of tasks each waiting for a database connection).
    to_nodes: tokio::sync::mpsc::Sender<String>,
    to_nodes_rx: Mutex<Option<tokio::sync::mpsc::Receiver<String>>>,
    join_rule: Option<Rule>,
    broadcast_rule: Option<Rule>,
    timeout: Duration,
    state: Mutex<State>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Join,
    Broadcast,
}

impl Channels {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        config: &RealtimeConfig,
    ) -> anyhow::Result<Arc<Channels>> {
        let compile = |rule: &Option<String>| {
            rule.as_deref()
                .map(Rule::compile_channel)
                .transpose()
                .map_err(|e| anyhow::anyhow!("realtime.channels: {e}"))
        };
        let (to_nodes, to_nodes_rx) = tokio::sync::mpsc::channel(NODE_QUEUE);
        Ok(Arc::new(Channels {
            node: crate::ids::new_id(),
            store,
            to_nodes,
            to_nodes_rx: Mutex::new(Some(to_nodes_rx)),
            join_rule: compile(&config.channels.join)?,
            broadcast_rule: compile(&config.channels.broadcast)?,
            timeout: Duration::from_secs(config.presence_timeout_secs),
            state: Mutex::new(State::default()),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `caller` may `action` on `channel`.
    pub(crate) fn may(&self, action: Action, caller: &Caller, channel: &str) -> bool {
        if caller.is_privileged() {
            return true;
        }
        let rule = match action {
            Action::Join => &self.join_rule,
            Action::Broadcast => &self.broadcast_rule,
        };
        rule.as_ref()
            .is_some_and(|r| r.allows_channel(caller.rule_auth().as_ref(), channel))
    }

    /// Adds (or, joined already, updates) a member; sends it the channel's whole presence and
    /// the others the join.
    pub(crate) fn join(
        &self,
        channel: &str,
        key: &str,
        caller: &Caller,
        presence: &Value,
        outbox: &Outbox,
    ) {
        let entry = entry(key, caller, presence);
        let (state_frame, others) = {
            let mut state = self.lock();
            let members = state.local.entry(channel.to_string()).or_default();
            members.insert(
                key.to_string(),
                Member {
                    outbox: outbox.clone(),
                    entry: entry.clone(),
                },
            );
            let mut all: Vec<Value> = members.values().map(|m| m.entry.clone()).collect();
            for node in state.remote.values() {
                if let Some(entries) = node.channels.get(channel) {
                    all.extend(entries.values().cloned());
                }
            }
            let others: Vec<Outbox> = state.local[channel]
                .iter()
                .filter(|(k, _)| k.as_str() != key)
                .map(|(_, m)| m.outbox.clone())
                .collect();
            (
                json!({"type": "presence", "channel": channel, "key": key, "state": all, "joins": [], "leaves": []})
                    .to_string(),
                others,
            )
        };
        outbox.send(state_frame);
        deliver(
            &others,
            &presence_diff(channel, std::slice::from_ref(&entry), &[]),
        );
        self.tell_nodes(NodeMessage::Join {
            n: self.node.clone(),
            c: channel.to_string(),
            e: entry,
        });
    }

    /// Removes a member (no-op when it is not one); tells the others.
    pub(crate) fn leave(&self, channel: &str, key: &str) -> bool {
        let (removed, others) = {
            let mut state = self.lock();
            let Some(members) = state.local.get_mut(channel) else {
                return false;
            };
            let removed = members.remove(key);
            let others: Vec<Outbox> = members.values().map(|m| m.outbox.clone()).collect();
            if members.is_empty() {
                state.local.remove(channel);
            }
            (removed, others)
        };
        let Some(removed) = removed else { return false };
        deliver(&others, &presence_diff(channel, &[], &[removed.entry]));
        self.tell_nodes(NodeMessage::Leave {
            n: self.node.clone(),
            c: channel.to_string(),
            k: key.to_string(),
        });
        true
    }

    /// Sends a broadcast to every other member of the channel, on every node.
    pub(crate) fn broadcast(&self, channel: &str, from: &str, event: &str, payload: &Value) {
        let frame = json!({"type": "broadcast", "channel": channel, "event": event, "payload": payload, "from": from})
            .to_string();
        let others = self.local_outboxes(channel, Some(from));
        deliver(&others, &frame);
        self.tell_nodes(NodeMessage::Broadcast {
            n: self.node.clone(),
            c: channel.to_string(),
            m: frame,
        });
    }

    fn local_outboxes(&self, channel: &str, except: Option<&str>) -> Vec<Outbox> {
        self.lock()
            .local
            .get(channel)
            .map(|members| {
                members
                    .iter()
                    .filter(|(k, _)| Some(k.as_str()) != except)
                    .map(|(_, m)| m.outbox.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn tell_nodes(&self, message: NodeMessage) {
        if self.store.dialect() == "sqlite" {
            return;
        }
        let body = serde_json::to_string(&message).unwrap_or_default();
        if self.to_nodes.try_send(body).is_err() {
            metrics::counter!("basalt_realtime_node_messages_dropped_total").increment(1);
        }
    }

    fn on_node_message(&self, body: &str) {
        let Ok(message) = serde_json::from_str::<NodeMessage>(body) else {
            tracing::debug!("ignoring a realtime message from another node that does not parse");
            return;
        };
        let from = match &message {
            NodeMessage::Join { n, .. }
            | NodeMessage::Leave { n, .. }
            | NodeMessage::Broadcast { n, .. }
            | NodeMessage::Heartbeat { n }
            | NodeMessage::Sync { n }
            | NodeMessage::State { n, .. }
            | NodeMessage::Bye { n } => n.clone(),
        };
        if from == self.node {
            return;
        }
        let mut unknown = false;
        let mut out: Vec<(Vec<Outbox>, String)> = Vec::new();
        {
            let mut state = self.lock();
            let state = &mut *state;
            if !matches!(message, NodeMessage::Bye { .. }) {
                let node = state.remote.entry(from.clone()).or_insert_with(|| {
                    unknown = true;
                    RemoteNode {
                        seen: Instant::now(),
                        channels: HashMap::new(),
                    }
                });
                node.seen = Instant::now();
            }
            let local = &state.local;
            let outboxes = |channel: &str| -> Vec<Outbox> {
                local
                    .get(channel)
                    .map(|m| m.values().map(|m| m.outbox.clone()).collect())
                    .unwrap_or_default()
            };
            match message {
                NodeMessage::Join { c, e, .. } => {
                    let key = e["key"].as_str().unwrap_or_default().to_string();
                    if let Some(node) = state.remote.get_mut(&from) {
                        node.channels
                            .entry(c.clone())
                            .or_default()
                            .insert(key, e.clone());
                    }
                    out.push((outboxes(&c), presence_diff(&c, &[e], &[])));
                }
                NodeMessage::Leave { c, k, .. } => {
                    let removed = state.remote.get_mut(&from).and_then(|node| {
                        let entries = node.channels.get_mut(&c)?;
                        let removed = entries.remove(&k);
                        if entries.is_empty() {
                            node.channels.remove(&c);
                        }
                        removed
                    });
                    if let Some(removed) = removed {
                        out.push((outboxes(&c), presence_diff(&c, &[], &[removed])));
                    }
                }
                NodeMessage::Broadcast { c, m, .. } => out.push((outboxes(&c), m)),
                NodeMessage::Heartbeat { .. } => {}
                NodeMessage::Sync { .. } => {
                    let s = state
                        .local
                        .iter()
                        .map(|(c, members)| {
                            (
                                c.clone(),
                                members.values().map(|m| m.entry.clone()).collect(),
                            )
                        })
                        .collect();
                    self.tell_nodes(NodeMessage::State {
                        n: self.node.clone(),
                        s,
                    });
                }
                NodeMessage::State { s, .. } => {
                    let fresh: HashMap<String, BTreeMap<String, Value>> = s
                        .into_iter()
                        .map(|(c, entries)| {
                            (
                                c,
                                entries
                                    .into_iter()
                                    .map(|e| (e["key"].as_str().unwrap_or_default().to_string(), e))
                                    .collect(),
                            )
                        })
                        .collect();
                    if let Some(node) = state.remote.get_mut(&from) {
                        let old = std::mem::replace(&mut node.channels, fresh);
                        for (c, joins, leaves) in diff_presence(&old, &node.channels) {
                            out.push((outboxes(&c), presence_diff(&c, &joins, &leaves)));
                        }
                    }
                }
                NodeMessage::Bye { .. } => {
                    if let Some(node) = state.remote.remove(&from) {
                        for (c, entries) in node.channels {
                            let leaves: Vec<Value> = entries.into_values().collect();
                            out.push((outboxes(&c), presence_diff(&c, &[], &leaves)));
                        }
                    }
                }
            }
        }
        for (outboxes, frame) in out {
            deliver(&outboxes, &frame);
        }
        if unknown {
            // A node first heard of now (or again after being timed out): ask for its state.
            self.tell_nodes(NodeMessage::Sync {
                n: self.node.clone(),
            });
        }
    }

    /// Forgets nodes not heard from within the timeout; their members leave.
    fn expire_nodes(&self) {
        let mut out = Vec::new();
        {
            let mut state = self.lock();
            let gone: Vec<String> = state
                .remote
                .iter()
                .filter(|(_, n)| n.seen.elapsed() > self.timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                tracing::info!(node = %id, "a realtime node stopped answering; its presence is dropped");
                if let Some(node) = state.remote.remove(&id) {
                    for (c, entries) in node.channels {
                        let outboxes: Vec<Outbox> = state
                            .local
                            .get(&c)
                            .map(|m| m.values().map(|m| m.outbox.clone()).collect())
                            .unwrap_or_default();
                        let leaves: Vec<Value> = entries.into_values().collect();
                        out.push((outboxes, presence_diff(&c, &[], &leaves)));
                    }
                }
            }
        }
        for (outboxes, frame) in out {
            deliver(&outboxes, &frame);
        }
    }

    /// Tells the other nodes this one is going (at shutdown), so its members leave at once.
    pub(crate) async fn goodbye(&self) {
        if self.store.dialect() == "sqlite" {
            return;
        }
        let body = serde_json::to_string(&NodeMessage::Bye {
            n: self.node.clone(),
        })
        .unwrap_or_default();
        let _ = self.store.send_to_nodes(&body).await;
    }

    /// Listens to the other nodes and sends heartbeats, until `this` is dropped. Nothing to
    /// do on SQLite.
    pub(crate) async fn run(this: std::sync::Weak<Channels>) {
        let Some(strong) = this.upgrade() else { return };
        if strong.store.dialect() == "sqlite" {
            return;
        }
        let beat = (strong.timeout / 3).max(Duration::from_millis(500));
        let outgoing = strong
            .to_nodes_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let sender = outgoing.map(|mut rx| {
            let store = strong.store.clone();
            tokio::spawn(async move {
                while let Some(body) = rx.recv().await {
                    if let Err(err) = store.send_to_nodes(&body).await {
                        tracing::warn!(error = %err, "could not send a realtime message to the other nodes");
                    }
                }
            })
        });
        drop(strong);
        let heartbeats = {
            let this = this.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(beat);
                loop {
                    tick.tick().await;
                    let Some(channels) = this.upgrade() else {
                        return;
                    };
                    channels.tell_nodes(NodeMessage::Heartbeat {
                        n: channels.node.clone(),
                    });
                    channels.expire_nodes();
                }
            })
        };
        loop {
            let Some(strong) = this.upgrade() else { break };
            let store = strong.store.clone();
            drop(strong);
            match store.node_messages().await {
                Ok(Some(mut stream)) => {
                    // Anything sent while not listening is unknown: ask every node again.
                    if let Some(channels) = this.upgrade() {
                        channels.tell_nodes(NodeMessage::Sync {
                            n: channels.node.clone(),
                        });
                    }
                    while let Some(body) = stream.next().await {
                        let Some(channels) = this.upgrade() else {
                            break;
                        };
                        channels.on_node_message(&body);
                    }
                    tracing::warn!("lost the connection listening for other nodes' realtime messages; reconnecting");
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot listen for other nodes' realtime messages; retrying")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        heartbeats.abort();
        if let Some(sender) = sender {
            sender.abort();
        }
    }
}

fn presence_diff(channel: &str, joins: &[Value], leaves: &[Value]) -> String {
    json!({"type": "presence", "channel": channel, "joins": joins, "leaves": leaves}).to_string()
}

/// Per channel, the entries that appeared and disappeared between two states of a node.
fn diff_presence(
    old: &HashMap<String, BTreeMap<String, Value>>,
    new: &HashMap<String, BTreeMap<String, Value>>,
) -> Vec<(String, Vec<Value>, Vec<Value>)> {
    let empty = BTreeMap::new();
    let mut out = Vec::new();
    let channels: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for c in channels {
        let (before, after) = (old.get(c).unwrap_or(&empty), new.get(c).unwrap_or(&empty));
        let joins: Vec<Value> = after
            .iter()
            .filter(|(k, e)| before.get(*k) != Some(*e))
            .map(|(_, e)| e.clone())
            .collect();
        let leaves: Vec<Value> = before
            .iter()
            .filter(|(k, _)| !after.contains_key(*k))
            .map(|(_, e)| e.clone())
            .collect();
        if !joins.is_empty() || !leaves.is_empty() {
            out.push((c.clone(), joins, leaves));
        }
    }
    out
}

fn deliver(outboxes: &[Outbox], frame: &str) {
    if outboxes.is_empty() {
        return;
    }
    let frame = super::Text::from(frame.to_string());
    for outbox in outboxes {
        outbox.send(frame.clone());
    }
}
