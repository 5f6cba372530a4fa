//! containerd's filter syntax, for `List` (Walk): `name==x`, `parent!=y`, `kind==committed`,
//! `labels."containerd.io/snapshot.ref"==sha256:…`, a bare field (present and non-empty),
//! selectors joined by `,` (all must hold), several filters (any may hold). Values may be
//! bare, `"quoted"` (with backslash escapes) or `/quoted/`. Regular-expression matches (`~=`)
//! are refused with a clear error rather than treated as equality.

use crate::meta::Snapshot;

/// A comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
}

/// One selector: a field path and a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter list: any of the filters, each all of its selectors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters(Vec<Vec<Selector>>);

/// A filter that cannot be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid filter {filter:?}: {reason}")]
pub struct FilterError {
    /// The filter.
    pub filter: String,
    /// Why.
    pub reason: String,
}

struct Lexer<'a> {
    s: &'a [u8],
    at: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }
    fn skip_space(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }
    fn quoted(&mut self, close: u8) -> Result<String, String> {
        self.at += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err("unterminated quote".into()),
                Some(b) if b == close => {
                    self.at += 1;
                    break;
                }
                Some(b'\\') => {
                    self.at += 1;
                    let e = self.peek().ok_or("dangling escape")?;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                    self.at += 1;
                }
                Some(b) => {
                    out.push(b);
                    self.at += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| "not UTF-8".into())
    }
    fn field(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(q @ (b'"' | b'/')) => self.quoted(q),
            Some(b) if b.is_ascii_alphanumeric() || b == b'_' => {
                let start = self.at;
                while self
                    .peek()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    self.at += 1;
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
            }
            _ => Err(format!("expected a field name at byte {}", self.at)),
        }
    }
    fn value(&mut self) -> Result<String, String> {
        if let Some(q @ (b'"' | b'/')) = self.peek() {
            return self.quoted(q);
        }
        let start = self.at;
        while self
            .peek()
            .is_some_and(|b| b != b',' && !b.is_ascii_whitespace())
        {
            self.at += 1;
        }
        if start == self.at {
            return Err(format!("expected a value at byte {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }
}

fn parse_one(text: &str) -> Result<Vec<Selector>, String> {
    let mut lx = Lexer {
        s: text.as_bytes(),
        at: 0,
    };
    let mut out = Vec::new();
    loop {
        lx.skip_space();
        let mut path = vec![lx.field()?];
        while lx.peek() == Some(b'.') {
            lx.at += 1;
            path.push(lx.field()?);
        }
        lx.skip_space();
        let rest = &lx.s[lx.at..];
        let op = if rest.starts_with(b"==") || rest.starts_with(b"!=") {
            let ne = rest[0] == b'!';
            lx.at += 2;
            lx.skip_space();
            let v = lx.value()?;
            if ne { Op::Ne(v) } else { Op::Eq(v) }
        } else if rest.starts_with(b"~=") {
            return Err("regular-expression matches (~=) are not supported".into());
        } else {
            Op::Present
        };
        out.push(Selector { path, op });
        lx.skip_space();
        match lx.peek() {
            None => return Ok(out),
            Some(b',') => lx.at += 1,
            Some(b) => return Err(format!("unexpected {:?} at byte {}", b as char, lx.at)),
        }
    }
}

impl Filters {
    /// Parses containerd filters (an empty list matches everything).
    pub fn parse(filters: &[String]) -> Result<Self, FilterError> {
        let mut all = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            all.push(parse_one(f).map_err(|reason| FilterError {
                filter: f.clone(),
                reason,
            })?);
        }
        Ok(Self(all))
    }

    /// Whether `s` matches.
    #[must_use]
    pub fn matches(&self, s: &Snapshot) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|sels| sels.iter().all(|sel| selector_matches(sel, s)))
    }
}

fn field<'a>(s: &'a Snapshot, path: &[String]) -> Option<&'a str> {
    match path {
        [f] if f == "name" => Some(&s.name),
        [f] if f == "parent" => Some(&s.parent),
        [f] if f == "kind" => Some(s.kind.as_str()),
        [f, rest @ ..] if f == "labels" && !rest.is_empty() => {
            s.labels.get(&rest.join(".")).map(String::as_str)
        }
        _ => None,
    }
}

fn selector_matches(sel: &Selector, s: &Snapshot) -> bool {
    let v = field(s, &sel.path);
    match &sel.op {
        Op::Present => v.is_some_and(|v| !v.is_empty()),
        Op::Eq(want) => v == Some(want.as_str()),
        Op::Ne(want) => v != Some(want.as_str()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::meta::Kind;

    #[test]
    fn containerd_filters_parse_and_match() {
        let mut s = Snapshot {
            id: 1,
            name: "default/3/sha256:aa".into(),
            parent: "p".into(),
            kind: Kind::Committed,
            labels: std::collections::BTreeMap::new(),
            created: (0, 0),
            updated: (0, 0),
            lazy: None,
        };
        s.labels
            .insert("containerd.io/snapshot.ref".into(), "sha256:aa".into());
        let f = |t: &[&str]| {
            Filters::parse(&t.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>()).unwrap()
        };
        // What containerd's metadata layer sends after an AlreadyExists.
        assert!(f(&[r#"labels."containerd.io/snapshot.ref"==sha256:aa,parent=="p""#]).matches(&s));
        assert!(!f(&[r#"labels."containerd.io/snapshot.ref"==sha256:aa,parent=="q""#]).matches(&s));
        assert!(f(&["kind==committed"]).matches(&s) && !f(&["kind==active"]).matches(&s));
        assert!(
            f(&["kind==active", "name!=x"]).matches(&s),
            "filters are OR'ed"
        );
        assert!(f(&["labels.\"containerd.io/snapshot.ref\""]).matches(&s));
        assert!(f(&[]).matches(&s));
        assert!(f(&["name==/default\\/3\\/sha256:aa/"]).matches(&s));
        for bad in ["name~=x", "==x", "name==", "labels.\"open", "name==a b"] {
            assert!(Filters::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
