//! Which monitors serve a guest: rendezvous (highest-random-weight) hashing.
//!
//! Every member gets a score for each guest from a fixed hash of `(member, guest)`; the guest's
//! monitors are the `k` members with the highest scores. Every party that knows the member set
//! computes the same answer without talking to the others, and a member leaving moves only the
//! guests it served (each to the member with the next score). The hash is FNV-1a 64 followed by
//! the splitmix64 finaliser — fixed here, so it is the same in every build and version (std's
//! `DefaultHasher` is not).

use std::collections::BTreeSet;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The score of `member` for `guest`: splitmix64(FNV-1a 64 of `member \0 guest`).
pub fn score(member: &str, guest: &str) -> u64 {
    let h = fnv1a(FNV_OFFSET, member.as_bytes());
    let h = fnv1a(h, &[0]);
    splitmix64(fnv1a(h, guest.as_bytes()))
}

/// The monitors of `guest`: the `k` members with the highest [`score`] (ties by name), highest
/// first; all of them if there are fewer than `k`.
pub fn assigned(guest: &str, members: &BTreeSet<String>, k: usize) -> Vec<String> {
    let mut scored: Vec<(u64, &String)> = members.iter().map(|m| (score(m, guest), m)).collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().take(k).map(|(_, m)| m.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_hash_is_fixed() {
        // Pinned values: a change here changes every fleet's assignment.
        assert_eq!(fnv1a(FNV_OFFSET, b""), FNV_OFFSET);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(score("m1", "g1"), score("m1", "g1"));
        assert_ne!(score("m1", "g1"), score("g1", "m1"));
        assert_ne!(score("m1", "g1"), score("m1g", "1"));
    }

    #[test]
    fn deterministic_and_exactly_min_k_n() {
        let members = set(&["a", "b", "c", "d"]);
        for k in 0..6 {
            let x = assigned("guest-7", &members, k);
            assert_eq!(x, assigned("guest-7", &members, k));
            assert_eq!(x.len(), k.min(members.len()));
            let distinct: BTreeSet<_> = x.iter().collect();
            assert_eq!(distinct.len(), x.len());
            // The k-set is a prefix of the (k+1)-set.
            assert_eq!(x[..], assigned("guest-7", &members, k + 1)[..x.len()]);
        }
        assert!(assigned("g", &BTreeSet::new(), 2).is_empty());
    }

    #[test]
    fn a_member_leaving_moves_only_its_guests() {
        let all = set(&["m1", "m2", "m3", "m4"]);
        let fewer = set(&["m1", "m2", "m4"]);
        let mut moved = 0;
        for i in 0..500 {
            let g = format!("guest-{i}");
            let before = assigned(&g, &all, 2);
            let after = assigned(&g, &fewer, 2);
            if before.iter().any(|m| m == "m3") {
                moved += 1;
                let kept: Vec<_> = before.iter().filter(|m| *m != "m3").collect();
                assert!(
                    kept.iter().all(|m| after.contains(m)),
                    "{g}: {before:?} -> {after:?}"
                );
                let new: Vec<_> = after.iter().filter(|m| !before.contains(m)).collect();
                assert_eq!(new.len(), 1, "{g}: {before:?} -> {after:?}");
            } else {
                assert_eq!(before, after, "{g} moved although m3 did not serve it");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn guests_spread_roughly_evenly() {
        let members = set(&["mon-a", "mon-b", "mon-c"]);
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..300 {
            for m in assigned(&format!("vm{i}"), &members, 1) {
                *count.entry(m).or_default() += 1;
            }
        }
        assert_eq!(count.len(), 3, "{count:?}");
        for (m, n) in &count {
            assert!(
                (70..=130).contains(n),
                "{m} has {n} of 300 guests: {count:?}"
            );
        }
    }
}
