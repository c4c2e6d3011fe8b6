//! Summary statistics of a run: nearest-rank percentiles, mean, max.

/// p50/p95/p99, mean and max of a sample; `None` fields for an empty sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub count: usize,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub mean: Option<f64>,
    pub max: Option<f64>,
}

/// The nearest-rank `p`-th percentile (0 < p <= 100) of `sorted` (ascending): the smallest
/// value with at least p% of the sample at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    // In 0..=len: the ceiling of a fraction in (0, 1] of len.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Summary {
    /// Summarises `values` (NaN values are ignored).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Summary {
        let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        Summary {
            count: v.len(),
            p50: percentile(&v, 50.0),
            p95: percentile(&v, 95.0),
            p99: percentile(&v, 99.0),
            mean,
            max: v.last().copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 95.0), Some(95.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&v, 0.0), None);
    }

    #[test]
    fn summary_of_unsorted_sample() {
        let s = Summary::of([4.0, 1.0, 3.0, 2.0, f64::NAN]);
        assert_eq!(s.count, 4);
        assert_eq!(s.p50, Some(2.0));
        assert_eq!(s.p95, Some(4.0));
        assert_eq!(s.p99, Some(4.0));
        assert_eq!(s.mean, Some(2.5));
        assert_eq!(s.max, Some(4.0));
        assert_eq!(Summary::of([]), Summary::default());
    }
}
