//! The routing table: host → site → longest-prefix route.
//!
//! Built once from a [`Config`] and never mutated; a reload builds a new
//! table and swaps it in with the rest of the [`Snapshot`](crate::routing::Snapshot),
//! so a request always sees one consistent table.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

#[cfg(test)]
use crate::config::Route;
use crate::config::{Action, Config, Site};
use crate::metrics::requests::{RequestTally, RouteCounts};

/// Host → site lookup plus each site's routes.
#[derive(Debug)]
pub struct RouteTable {
    sites: Vec<Site>,
    /// Exact host name → index into `sites`.
    exact: HashMap<String, usize>,
    /// `*.suffix` patterns as (".suffix", site), longest suffix first so the
    /// most specific wildcard wins.
    wildcards: Vec<(String, usize)>,
    /// The `hosts = ["*"]` site, if any: unknown hosts land here instead of 421.
    catch_all: Option<usize>,
    /// With the metrics endpoint on: where each route to a service counts
    /// its requests, `[site][route]`, found here once rather than per request.
    counts: Vec<Vec<Option<Arc<RouteCounts>>>>,
    /// Where those blocks come from, for the tables built after this one.
    tally: Option<Arc<RequestTally>>,
}

impl RouteTable {
    pub fn new(config: &Config) -> RouteTable {
        RouteTable::counted(config, None)
    }

    /// A table whose routes to services count their requests in `tally`
    /// (the metrics endpoint is on); a site is labelled by its first host.
    pub fn counted(config: &Config, tally: Option<Arc<RequestTally>>) -> RouteTable {
        let counts = match &tally {
            None => Vec::new(),
            Some(tally) => config
                .sites
                .iter()
                .map(|site| {
                    let label = site.hosts.first().map_or("", String::as_str);
                    site.routes
                        .iter()
                        .map(|route| match &route.action {
                            Action::Service(name) => Some(tally.counts_for(label, name)),
                            _ => None,
                        })
                        .collect()
                })
                .collect(),
        };
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        let mut catch_all = None;
        for (index, site) in config.sites.iter().enumerate() {
            for host in &site.hosts {
                if host == "*" {
                    catch_all = Some(index);
                } else if let Some(suffix) = host.strip_prefix('*') {
                    wildcards.push((suffix.to_string(), index));
                } else {
                    exact.insert(host.clone(), index);
                }
            }
        }
        wildcards.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        RouteTable {
            sites: config.sites.clone(),
            exact,
            wildcards,
            catch_all,
            counts,
            tally,
        }
    }

    /// Where this table's blocks come from (`None`: metrics are off).
    pub fn tally(&self) -> Option<&Arc<RequestTally>> {
        self.tally.as_ref()
    }

    /// The site for a host name (already lower-cased, port removed).
    /// Exact names win over wildcards, wildcards over the catch-all.
    pub fn site(&self, host: &str) -> Option<&Site> {
        self.site_index(host)
            .and_then(|index| self.sites.get(index))
    }

    /// The site at `index` (from [`RouteTable::site_index`]).
    pub fn site_at(&self, index: usize) -> Option<&Site> {
        self.sites.get(index)
    }

    /// Where route `route` of site `site` counts its requests, when the
    /// metrics endpoint is on and the route forwards to a service.
    pub fn counts(&self, site: usize, route: usize) -> Option<&Arc<RouteCounts>> {
        self.counts.get(site)?.get(route)?.as_ref()
    }

    /// [`RouteTable::site`], as an index.
    pub fn site_index(&self, host: &str) -> Option<usize> {
        self.exact
            .get(host)
            .copied()
            .or_else(|| {
                self.wildcards
                    .iter()
                    .find(|(suffix, _)| {
                        host.len() > suffix.len() && host.ends_with(suffix.as_str())
                    })
                    .map(|(_, index)| *index)
            })
            .or(self.catch_all)
    }
}

/// The route whose prefix matches `path` longest. Prefixes match whole path
/// segments: `/api` matches `/api` and `/api/users` but not `/apiary`, so a
/// route never captures a neighbour by accident (nginx's plain prefixes do).
#[cfg(test)]
pub fn route<'a>(site: &'a Site, path: &str) -> Option<&'a Route> {
    route_index(site, path).and_then(|index| site.routes.get(index))
}

/// [`route`], as an index into the site's routes.
pub fn route_index(site: &Site, path: &str) -> Option<usize> {
    site.routes
        .iter()
        .position(|route| prefix_matches(&route.path, path))
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// Normalizes a Host header or URI authority to a lookup key: lower case,
/// port and trailing dot removed. Returns `None` for values that are not a
/// plausible host (those requests get 400).
pub fn normalize_host(authority: &str) -> Option<Cow<'_, str>> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: keep the brackets off, drop the port.
        let end = rest.find(']')?;
        &rest[..end]
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            Some(_) => return None,
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    if !valid {
        return None;
    }
    // Lower-case only when needed: most clients already send lower case.
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Action;
    use std::path::Path;

    fn table() -> RouteTable {
        let config = Config::parse(
            r#"
[[site]]
hosts = ["example.org"]
service = "web"
[[site.route]]
path = "/api"
service = "api"
[[site.route]]
path = "/static/"
status = 204
[[site]]
hosts = ["*.example.org"]
service = "api"
[[site]]
hosts = ["*.deep.example.org"]
service = "web"
[service.web]
upstream = "127.0.0.1:1"
[service.api]
upstream = "127.0.0.1:2"
"#,
            "t.toml",
            Path::new("."),
        )
        .expect("valid config");
        RouteTable::new(&config)
    }

    fn action_for(table: &RouteTable, host: &str, path: &str) -> Option<Action> {
        let site = table.site(host)?;
        route(site, path).map(|r| r.action.clone())
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = table();
        let web = Some(Action::Service("web".into()));
        let api = Some(Action::Service("api".into()));
        assert_eq!(action_for(&t, "example.org", "/"), web);
        assert_eq!(action_for(&t, "example.org", "/api"), api);
        assert_eq!(action_for(&t, "example.org", "/api/users?x=1"), api);
        assert_eq!(action_for(&t, "example.org", "/apiary"), web);
        assert_eq!(
            action_for(&t, "example.org", "/static/a.css"),
            Some(Action::Status(204))
        );
    }

    #[test]
    fn wildcards_most_specific_first_and_unknown_hosts() {
        let t = table();
        assert_eq!(
            action_for(&t, "a.example.org", "/"),
            Some(Action::Service("api".into()))
        );
        assert_eq!(
            action_for(&t, "x.deep.example.org", "/"),
            Some(Action::Service("web".into()))
        );
        assert!(t.site("other.org").is_none());
        assert!(
            t.site("deep.example.org").is_some(),
            "matches *.example.org"
        );
    }

    #[test]
    fn host_normalization() {
        assert_eq!(
            normalize_host("Example.ORG:8443").as_deref(),
            Some("example.org")
        );
        assert_eq!(
            normalize_host("example.org.").as_deref(),
            Some("example.org")
        );
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("::1"));
        assert_eq!(normalize_host("bad host"), None);
        assert_eq!(normalize_host("a:b"), None);
        assert_eq!(normalize_host(""), None);
    }
}
