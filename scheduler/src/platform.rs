//! Platform properties: what an action requires and what a worker offers, matched per
//! property by its declared kind (sans-IO).

use kiln_config::PropertyKind;
use std::collections::{BTreeMap, HashMap};

/// How each property is matched; properties not listed match exactly.
#[derive(Debug, Clone, Default)]
pub struct Kinds(pub BTreeMap<String, PropertyKind>);

impl Kinds {
    fn of(&self, name: &str) -> PropertyKind {
        self.0.get(name).copied().unwrap_or(PropertyKind::Exact)
    }
}

/// An action's requirements (`Platform.properties`), sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements(Vec<(String, String)>);

/// A worker's offer: each property name with its values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Offer(HashMap<String, Vec<String>>);

/// Amounts of `minimum` properties held by running actions on one worker.
pub type Consumed = HashMap<String, u64>;

impl std::fmt::Display for Requirements {
    /// `name=value, name=value`, or `no properties`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no properties");
        }
        for (i, (name, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

impl Requirements {
    /// Requirements from name/value pairs; a `minimum` property must be a whole number.
    pub fn new(kinds: &Kinds, mut pairs: Vec<(String, String)>) -> Result<Requirements, String> {
        for (name, value) in &pairs {
            if kinds.of(name) == PropertyKind::Minimum && value.parse::<u64>().is_err() {
                return Err(format!(
                    "platform property {name} must be a whole number, not {value:?}"
                ));
            }
        }
        pairs.sort();
        pairs.dedup();
        Ok(Requirements(pairs))
    }

    /// The pairs, sorted.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

impl Offer {
    /// An offer from `NAME=VALUE` pairs (a name may repeat).
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Offer {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (name, value) in pairs {
            map.entry(name).or_default().push(value);
        }
        Offer(map)
    }

    fn capacity(&self, name: &str) -> Option<u64> {
        self.0
            .get(name)?
            .iter()
            .filter_map(|v| v.parse::<u64>().ok())
            .max()
    }
}

/// Whether a worker offering `offer`, with `consumed` already taken, can run an action
/// requiring `req`.
pub fn fits(kinds: &Kinds, req: &Requirements, offer: &Offer, consumed: &Consumed) -> bool {
    req.0.iter().all(|(name, value)| match kinds.of(name) {
        PropertyKind::Ignore => true,
        PropertyKind::Exact => offer
            .0
            .get(name)
            .is_some_and(|values| values.iter().any(|v| v == value)),
        PropertyKind::Minimum => {
            let need: u64 = value.parse().unwrap_or(u64::MAX);
            let have = offer.capacity(name).unwrap_or(0);
            have.saturating_sub(consumed.get(name).copied().unwrap_or(0)) >= need
        }
    })
}

/// Whether a worker could ever run the action (ignoring what is consumed now).
pub fn could_fit(kinds: &Kinds, req: &Requirements, offer: &Offer) -> bool {
    fits(kinds, req, offer, &Consumed::new())
}

/// Takes (`sign` > 0) or returns (`sign` < 0) what an action consumes.
pub fn consume(kinds: &Kinds, req: &Requirements, consumed: &mut Consumed, take: bool) {
    for (name, value) in &req.0 {
        if kinds.of(name) != PropertyKind::Minimum {
            continue;
        }
        let amount: u64 = value.parse().unwrap_or(0);
        let slot = consumed.entry(name.clone()).or_default();
        *slot = if take {
            slot.saturating_add(amount)
        } else {
            slot.saturating_sub(amount)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn kinds() -> Kinds {
        Kinds(BTreeMap::from([
            ("cores".to_string(), PropertyKind::Minimum),
            ("image".to_string(), PropertyKind::Ignore),
        ]))
    }

    #[test]
    fn exact_minimum_and_ignore() {
        let k = kinds();
        let offer = Offer::new(pairs(&[
            ("OSFamily", "linux"),
            ("ISA", "x86-64"),
            ("ISA", "avx2"),
            ("cores", "8"),
        ]));
        let req = |p| Requirements::new(&k, pairs(p)).unwrap();
        assert!(fits(&k, &req(&[]), &offer, &Consumed::new()));
        assert!(fits(
            &k,
            &req(&[("OSFamily", "linux"), ("ISA", "avx2")]),
            &offer,
            &Consumed::new()
        ));
        assert!(!fits(
            &k,
            &req(&[("OSFamily", "macos")]),
            &offer,
            &Consumed::new()
        ));
        assert!(
            !fits(&k, &req(&[("gpu", "1")]), &offer, &Consumed::new()),
            "undeclared properties match exactly"
        );
        assert!(fits(
            &k,
            &req(&[("image", "anything")]),
            &offer,
            &Consumed::new()
        ));
        let four = req(&[("cores", "4")]);
        let mut consumed = Consumed::new();
        assert!(fits(&k, &four, &offer, &consumed));
        consume(&k, &four, &mut consumed, true);
        consume(&k, &four, &mut consumed, true);
        assert!(
            !fits(&k, &four, &offer, &consumed),
            "8 cores hold two 4-core actions"
        );
        assert!(could_fit(&k, &four, &offer));
        consume(&k, &four, &mut consumed, false);
        assert!(fits(&k, &four, &offer, &consumed));
        assert!(!could_fit(&k, &req(&[("cores", "9")]), &offer));
    }

    #[test]
    fn minimum_values_must_be_numbers() {
        assert!(Requirements::new(&kinds(), pairs(&[("cores", "many")])).is_err());
        assert!(Requirements::new(&kinds(), pairs(&[("OSFamily", "many")])).is_ok());
    }
}
