//! Length buckets: sequences of similar length padded and run together.
//!
//! An edit batch mixes an edit prompt with its prefixed and question-framed copies (about twice
//! as long): padded as one, a third of the rows every block computes were padding (geo's first
//! 64 edits: 2663 real rows of 4008). Each bucket is padded to its own longest instead.

/// The padded rows one more bucket must save to pay for itself: each bucket's pass reads the
/// trained blocks' weights again (about as long as a few rows' products) and runs its own
/// smaller, less efficient products.
pub const BUCKET_OVERHEAD_ROWS: usize = 32;

/// Splits sequences of lengths `lens` into buckets (indices, ascending within each) that each
/// get padded to their own longest: the split of the length-sorted order that minimises the
/// padded rows plus `overhead` per bucket (exact, by dynamic programming over split points).
pub fn length_buckets(lens: &[usize], overhead: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (lens[i], i));
    let n = order.len();
    // best[i]: the cheapest split of the i shortest; cut[i]: where its last bucket starts.
    let mut best = vec![0usize; n + 1];
    let mut cut = vec![0usize; n + 1];
    for i in 1..=n {
        let longest = lens[order[i - 1]];
        (best[i], cut[i]) = (0..i)
            .map(|j| {
                (
                    best[j]
                        .saturating_add((i - j) * longest)
                        .saturating_add(overhead),
                    j,
                )
            })
            .min()
            .expect("i >= 1");
    }
    let mut buckets = Vec::new();
    let mut end = n;
    while end > 0 {
        let mut members = order[cut[end]..end].to_vec();
        members.sort_unstable();
        buckets.push(members);
        end = cut[end];
    }
    buckets.reverse();
    buckets
}

#[cfg(test)]
mod tests {
    use super::length_buckets;

    #[test]
    fn length_buckets_split_where_padding_costs_more_than_a_bucket() {
        // Two short and two long: in pairs when a bucket is cheap, together when it is dear, each
        // alone when it is free.
        assert_eq!(
            length_buckets(&[30, 10, 31, 11], 2),
            [vec![1, 3], vec![0, 2]]
        );
        assert_eq!(length_buckets(&[30, 10, 31, 11], 0).len(), 4);
        assert_eq!(length_buckets(&[30, 10, 31, 11], 100), [vec![0, 1, 2, 3]]);
        // 10 rows of padding against a bucket's price of 9 and 11.
        assert_eq!(length_buckets(&[10, 20], 9), [vec![0], vec![1]]);
        assert_eq!(length_buckets(&[10, 20], 11), [vec![0, 1]]);
        assert!(length_buckets(&[], 0).is_empty());
        // Every sequence in exactly one bucket, members ascending, buckets by length.
        let lens = [7, 14, 17, 8, 15, 18, 10, 14, 17, 13, 20, 23];
        let buckets = length_buckets(&lens, 4);
        let mut all: Vec<usize> = buckets.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
        for b in &buckets {
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
        for w in buckets.windows(2) {
            let longest = w[0].iter().map(|&i| lens[i]).max().unwrap();
            assert!(w[1].iter().all(|&i| lens[i] >= longest));
        }
    }
}
