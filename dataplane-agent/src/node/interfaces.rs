//! Which host interfaces are pod interfaces, and when they come and go:
//! netlink link notifications, so a pod created after start-up gets the
//! programs within moments and a deleted one is forgotten.

use futures::{StreamExt as _, TryStreamExt as _};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rtnetlink::{
    constants::RTMGRP_LINK,
    packet_core::NetlinkPayload,
    packet_route::{
        link::{LinkAttribute, LinkMessage},
        RouteNetlinkMessage,
    },
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Present {
        ifindex: u32,
        name: String,
    },
    Gone {
        ifindex: u32,
    },
    /// Every interface present at start has been reported.
    InitialListDone,
}

#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("invalid --pod-ifaces pattern {pattern:?}")]
    Pattern {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("opening a netlink socket for link events")]
    Netlink(#[source] std::io::Error),
}

/// `--pod-ifaces` patterns, e.g. `veth*,cali*`.
#[derive(Debug, Clone)]
pub struct PodInterfaceFilter(GlobSet);

impl PodInterfaceFilter {
    pub fn new(patterns: &[String]) -> Result<Self, InterfaceError> {
        let mut set = GlobSetBuilder::new();
        for pattern in patterns {
            let glob = Glob::new(pattern).map_err(|source| InterfaceError::Pattern {
                pattern: pattern.clone(),
                source,
            })?;
            set.add(glob);
        }
        let set = set.build().map_err(|source| InterfaceError::Pattern {
            pattern: patterns.join(","),
            source,
        })?;
        Ok(Self(set))
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.is_match(name)
    }
}

fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// Streams the pod interfaces present now, then every change. Subscribes
/// before listing so no interface created in between is missed.
pub fn watch(filter: PodInterfaceFilter) -> Result<mpsc::Receiver<LinkEvent>, InterfaceError> {
    let (mut connection, handle, mut messages) =
        rtnetlink::new_connection().map_err(InterfaceError::Netlink)?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK))
        .map_err(InterfaceError::Netlink)?;
    tokio::spawn(connection);
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut existing = handle.link().get().execute();
        loop {
            match existing.try_next().await {
                Ok(Some(msg)) => {
                    if let Some(name) = link_name(&msg).filter(|n| filter.matches(n)) {
                        let event = LinkEvent::Present {
                            ifindex: msg.header.index,
                            name: name.to_owned(),
                        };
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::error!("listing interfaces: {e}");
                    break;
                }
            }
        }
        if tx.send(LinkEvent::InitialListDone).await.is_err() {
            return;
        }
        while let Some((message, _)) = messages.next().await {
            let event = match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(msg)) => link_name(&msg)
                    .filter(|n| filter.matches(n))
                    .map(|name| LinkEvent::Present {
                        ifindex: msg.header.index,
                        name: name.to_owned(),
                    }),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(msg)) => {
                    Some(LinkEvent::Gone {
                        ifindex: msg.header.index,
                    })
                }
                _ => None,
            };
            if let Some(event) = event {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
        log::error!("netlink link notifications ended");
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_interface_patterns_match_only_pod_interfaces() {
        let filter = PodInterfaceFilter::new(&["veth*".into(), "cali*".into()]).unwrap();
        assert!(filter.matches("veth1234"));
        assert!(filter.matches("cali0abc"));
        assert!(!filter.matches("eth0"));
        assert!(!filter.matches("cbr0"));
    }

    #[test]
    fn bad_pattern_is_named_in_the_error() {
        let err = PodInterfaceFilter::new(&["veth[".into()]).unwrap_err();
        assert!(err.to_string().contains("veth["), "{err}");
    }
}
