//! Who may call: an optional allowlist of source networks. Behind a load balancer the peer is
//! the balancer, so `X-Forwarded-For` is believed only when the peer is a configured trusted
//! proxy — otherwise anyone could claim any address.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct SourcePolicy {
    /// Empty: every source may call (the signature still applies).
    pub allow: Vec<IpNet>,
    pub trusted_proxies: Vec<IpNet>,
}

impl SourcePolicy {
    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the peer, or — through trusted proxies — the nearest
    /// `X-Forwarded-For` hop that is not one of them.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.trusted(ip) => client = ip,
                Ok(ip) => return ip,
                // A hop we cannot read: stop at the last address we could vouch for.
                Err(_) => return client,
            }
        }
        client
    }

    pub fn allows(&self, peer: IpAddr, headers: &HeaderMap) -> bool {
        if self.allow.is_empty() {
            return true;
        }
        let client = self.client(peer, headers);
        // An IPv4 client may arrive as an IPv4-mapped IPv6 address on a dual-stack socket.
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
            v4 => v4,
        };
        self.allow.iter().any(|n| n.contains(&client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], proxies: &[&str]) -> SourcePolicy {
        SourcePolicy {
            allow: allow.iter().map(|n| n.parse().unwrap()).collect(),
            trusted_proxies: proxies.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let p = policy(&["203.0.113.0/24"], &["10.0.0.0/8"]);
        let lb: IpAddr = "10.1.1.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(p.allows(lb, &xff("203.0.113.5")));
        assert!(p.allows(lb, &xff("198.51.100.1, 203.0.113.5, 10.2.2.2")));
        assert!(!p.allows(lb, &xff("203.0.113.5, 198.51.100.1")));
        // A stranger cannot talk its way in.
        assert!(!p.allows(stranger, &xff("203.0.113.5")));
        assert!(!p.allows(lb, &HeaderMap::new()));
        assert!(!p.allows(lb, &xff("garbage")));
        assert!(p.allows("::ffff:203.0.113.7".parse().unwrap(), &HeaderMap::new()));
        assert!(policy(&[], &[]).allows(stranger, &HeaderMap::new()));
    }
}
