//! Statistics over rounds and latencies: percentiles, medians, means, spreads and the
//! engine/raw ratio of each round.

/// How a figure's per-round ratio is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ratio {
    /// Engine time per operation / raw time per operation (lower is better).
    Cost,
    /// Engine throughput / raw throughput (higher is better).
    Speed,
    /// No raw counterpart.
    None,
}

/// The engine/raw ratio of each round, from per-round rates (`NaN` for [`Ratio::None`]).
pub(super) fn per_round_ratios(ratio: Ratio, engine: &[f64], raw: &[f64]) -> Vec<f64> {
    engine
        .iter()
        .zip(raw)
        .map(|(e, r)| match ratio {
            // Rates: time per op is 1/rate.
            Ratio::Cost => r / e,
            Ratio::Speed => e / r,
            Ratio::None => f64::NAN,
        })
        .collect()
}

/// The value at percentile `p` (0..=100) of `sorted`, nearest rank; 0 when empty.
pub(super) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median of the values that are not `NaN`; `NaN` when there are none.
pub(super) fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The smallest and the largest value (`(inf, -inf)` when empty).
pub(super) fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(*x), b.max(*x))
        })
}

/// The mean of `v`; 0 when empty.
pub(super) fn mean(v: &[u64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64
    }
}

/// A sorted copy of `v`.
pub(super) fn sorted(v: &[u64]) -> Vec<u64> {
    let mut s = v.to_vec();
    s.sort_unstable();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_median_and_ratios() {
        let s = sorted(&[40, 10, 30, 20, 50]);
        assert_eq!(s, [10, 20, 30, 40, 50]);
        assert_eq!(percentile(&s, 50.0), 30);
        assert_eq!(percentile(&s, 99.0), 50);
        assert_eq!(percentile(&[], 50.0), 0);
        assert!((mean(&s) - 30.0).abs() < 1e-9);
        assert!((median(&[3.0, f64::NAN, 1.0, 2.0, 4.0]) - 2.5).abs() < 1e-9);
        assert!(median(&[f64::NAN]).is_nan());
        assert_eq!(min_max(&[2.0, -1.0, 5.0]), (-1.0, 5.0));
        // Cost: engine at half the raw rate costs twice the time per operation.
        assert_eq!(per_round_ratios(Ratio::Cost, &[50.0], &[100.0]), [2.0]);
        assert_eq!(per_round_ratios(Ratio::Speed, &[50.0], &[100.0]), [0.5]);
        assert!(per_round_ratios(Ratio::None, &[1.0], &[1.0])[0].is_nan());
    }
}
