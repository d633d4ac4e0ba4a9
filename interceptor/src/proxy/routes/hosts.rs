//! Server names for TLS passthrough: a Gateway API `hostnames` entry or an Istio
//! `sniHosts` entry ([`HostPattern`]: exact, or a `*.` wildcard matching one or more
//! labels), a listener's `hostname` narrowing a route's, and [`SniRoutes`], the routes
//! of one TLS listener by name with Gateway API precedence: an exact name over any
//! wildcard, a longer wildcard over a shorter one, a route without hostnames last; the
//! oldest route holds a name two routes claim (settled when the table is compiled).
use std::collections::HashMap;

/// One server name pattern, lower-cased.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum HostPattern {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: names ending with it (at least one label
    /// more).
    Wildcard(String),
    /// `*` (Istio) or no hostnames at all (Gateway API): every name, and no name.
    Any,
}

impl HostPattern {
    /// A `hostnames`/`sniHosts` entry; `star_alone`: whether `*` by itself is allowed
    /// (Istio's `sniHosts`; Gateway API says "no hostnames" instead).
    pub(crate) fn parse(host: &str, star_alone: bool) -> Result<Self, String> {
        let lower = host.to_ascii_lowercase();
        if lower == "*" && star_alone {
            return Ok(HostPattern::Any);
        }
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            return Err(format!(
                "{host:?} is not a DNS name or a `*.` wildcard of one"
            ));
        }
        if name
            .split('.')
            .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!("{host:?} is an IP address, not a server name"));
        }
        Ok(if wildcard {
            HostPattern::Wildcard(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_owned())
        })
    }

    /// Whether a ClientHello with server name `sni` (lower-cased; `None`: it sent none)
    /// matches.
    pub(crate) fn matches(&self, sni: Option<&str>) -> bool {
        match (self, sni) {
            (HostPattern::Any, _) => true,
            (HostPattern::Exact(name), Some(sni)) => name == sni,
            (HostPattern::Wildcard(suffix), Some(sni)) => {
                sni.len() > suffix.len() && sni.ends_with(suffix.as_str())
            }
            (_, None) => false,
        }
    }

    /// The names both patterns match, as one pattern (a listener's `hostname` narrowing
    /// a route's), or `None` when they share none.
    pub(crate) fn intersect(&self, other: &HostPattern) -> Option<HostPattern> {
        use HostPattern::*;
        match (self, other) {
            (Any, p) | (p, Any) => Some(p.clone()),
            (Exact(a), Exact(b)) => (a == b).then(|| self.clone()),
            (Exact(name), w @ Wildcard(_)) | (w @ Wildcard(_), Exact(name)) => {
                w.matches(Some(name)).then(|| Exact(name.clone()))
            }
            (Wildcard(a), Wildcard(b)) => {
                if a.ends_with(b.as_str()) {
                    Some(self.clone())
                } else if b.ends_with(a.as_str()) {
                    Some(other.clone())
                } else {
                    None
                }
            }
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

/// Which of a listener's routes (by index) serves each name.
#[derive(Debug)]
pub(crate) struct SniRoutes<T> {
    exact: HashMap<String, usize>,
    /// Longest suffix first.
    wildcards: Vec<(String, usize)>,
    any: Option<usize>,
    routes: Vec<T>,
}

impl<T> Default for SniRoutes<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcards: Vec::new(),
            any: None,
            routes: Vec::new(),
        }
    }
}

impl<T> SniRoutes<T> {
    /// The route that holds `pattern`, if one does.
    pub(crate) fn holder(&self, pattern: &HostPattern) -> Option<&T> {
        let index = match pattern {
            HostPattern::Exact(name) => self.exact.get(name).copied(),
            HostPattern::Wildcard(suffix) => self
                .wildcards
                .iter()
                .find(|(s, _)| s == suffix)
                .map(|(_, i)| *i),
            HostPattern::Any => self.any,
        };
        index.map(|i| &self.routes[i])
    }

    /// Add a route (callers add the oldest first) for `patterns` not held yet.
    pub(crate) fn add(&mut self, route: T, patterns: &[HostPattern]) {
        let index = self.routes.len();
        self.routes.push(route);
        for pattern in patterns {
            match pattern {
                HostPattern::Exact(name) => drop(self.exact.entry(name.clone()).or_insert(index)),
                HostPattern::Wildcard(suffix) => {
                    if !self.wildcards.iter().any(|(s, _)| s == suffix) {
                        self.wildcards.push((suffix.clone(), index));
                        // Stable: among equal lengths the older stays first.
                        self.wildcards
                            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
                    }
                }
                HostPattern::Any => drop(self.any.get_or_insert(index)),
            }
        }
    }

    /// The route for a ClientHello with server name `sni` (lower-cased).
    pub(crate) fn lookup(&self, sni: Option<&str>) -> Option<&T> {
        let index = sni
            .and_then(|sni| {
                self.exact.get(sni).copied().or_else(|| {
                    self.wildcards
                        .iter()
                        .find(|(suffix, _)| sni.len() > suffix.len() && sni.ends_with(suffix))
                        .map(|(_, i)| *i)
                })
            })
            .or(self.any)?;
        Some(&self.routes[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(host: &str) -> HostPattern {
        HostPattern::parse(host, true).unwrap()
    }

    #[test]
    fn patterns_parse_lower_cased_and_refuse_what_is_not_a_name() {
        assert_eq!(
            p("A.Example.com"),
            HostPattern::Exact("a.example.com".into())
        );
        assert_eq!(
            p("*.example.com"),
            HostPattern::Wildcard(".example.com".into())
        );
        assert_eq!(p("*"), HostPattern::Any);
        assert!(HostPattern::parse("*", false).is_err());
        for bad in [
            "",
            "a..b",
            "*.",
            "foo.*.com",
            "a b",
            "10.0.0.1",
            "-a.com",
            "x.com.",
        ] {
            assert!(HostPattern::parse(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_wildcard_matches_one_or_more_labels_but_not_its_own_suffix() {
        let w = p("*.example.com");
        assert!(w.matches(Some("a.example.com")));
        assert!(w.matches(Some("a.b.example.com")));
        assert!(!w.matches(Some("example.com")));
        assert!(!w.matches(Some("aexample.com")));
        assert!(!w.matches(None));
        assert!(p("*").matches(None));
    }

    #[test]
    fn a_listener_hostname_narrows_the_route_hostnames() {
        let cases = [
            ("*.example.com", "a.example.com", Some("a.example.com")),
            ("a.example.com", "*.example.com", Some("a.example.com")),
            ("*.example.com", "*.a.example.com", Some("*.a.example.com")),
            ("*", "b.example.com", Some("b.example.com")),
            ("a.example.com", "b.example.com", None),
            ("*.example.com", "example.com", None),
        ];
        for (listener, route, both) in cases {
            assert_eq!(
                p(listener).intersect(&p(route)).map(|h| h.to_string()),
                both.map(str::to_owned),
                "{listener} ∩ {route}"
            );
        }
    }

    #[test]
    fn exact_beats_the_longest_wildcard_beats_shorter_ones_beats_no_hostnames() {
        let mut routes = SniRoutes::default();
        routes.add("catch-all", &[HostPattern::Any]);
        routes.add("short", &[p("*.com")]);
        routes.add("long", &[p("*.example.com")]);
        routes.add("exact", &[p("a.example.com")]);
        // Younger routes do not take a name an older one holds.
        routes.add(
            "late",
            &[p("a.example.com"), p("*.example.com"), HostPattern::Any],
        );
        assert_eq!(routes.lookup(Some("a.example.com")), Some(&"exact"));
        assert_eq!(routes.lookup(Some("b.example.com")), Some(&"long"));
        assert_eq!(routes.lookup(Some("x.b.example.com")), Some(&"long"));
        assert_eq!(routes.lookup(Some("other.com")), Some(&"short"));
        assert_eq!(routes.lookup(Some("example.org")), Some(&"catch-all"));
        assert_eq!(routes.lookup(None), Some(&"catch-all"));
        assert_eq!(routes.holder(&p("*.example.com")), Some(&"long"));

        let mut exact_only = SniRoutes::default();
        exact_only.add("a", &[p("a.example.com")]);
        assert_eq!(exact_only.lookup(Some("b.example.com")), None);
        assert_eq!(exact_only.lookup(None), None);
    }
}
