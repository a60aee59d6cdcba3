//! Latency statistics of a benchmark run, computed after the run from the per-request latencies
//! the I/O loop recorded (nothing here runs per I/O): min/max/mean/standard deviation,
//! nearest-rank percentiles, and a log-linear histogram laid out as fio's (`stat.h`: 64 linear
//! buckets per power of two above 128 ns, 29 groups), so that the `bins` of
//! `vhostuser-rs bench --output-format json+` read like fio's own `json+` output.

/// Linear buckets per power of two (fio's FIO_IO_U_PLAT_BITS = 6).
const PLAT_BITS: u32 = 6;
/// 64.
const PLAT_VAL: u64 = 1 << PLAT_BITS;
/// Number of buckets (29 groups of 64, fio's FIO_IO_U_PLAT_NR): the last one holds everything
/// from about 17 s up (a recorded latency is at most 4.3 s: u32 nanoseconds).
pub const BUCKETS: usize = 29 * PLAT_VAL as usize;

/// The percentiles fio reports by default (its `percentile_list`).
pub const FIO_PERCENTILES: [f64; 17] =
    [1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99];

/// Summary of a set of latencies, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Smallest.
    pub min: u64,
    /// Largest.
    pub max: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator, as fio); 0 below two samples.
    pub stddev: f64,
}

/// Min, max, mean and standard deviation of `samples` (any order).
pub fn summarize(samples: &[u32]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    let n = samples.len() as f64;
    let (mut min, mut max, mut sum) = (u64::MAX, 0u64, 0f64);
    for &s in samples {
        min = min.min(u64::from(s));
        max = max.max(u64::from(s));
        sum += f64::from(s);
    }
    let mean = sum / n;
    let var = if samples.len() > 1 {
        samples.iter().map(|&s| (f64::from(s) - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Summary { count: samples.len() as u64, min, max, mean, stddev: var.sqrt() }
}

/// The nearest-rank `p`-th percentile (0 < p <= 100) of `sorted` (ascending): the smallest
/// sample with at least p % of the samples at or below it. 0 for no samples.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The histogram bucket of a latency of `ns` nanoseconds: values below 128 have a bucket each;
/// above, each power of two [2^k, 2^(k+1)) is split into 64 equal buckets.
pub fn bucket_index(ns: u64) -> usize {
    if ns < 2 * PLAT_VAL {
        return ns as usize;
    }
    let msb = 63 - ns.leading_zeros();
    let error_bits = msb - PLAT_BITS;
    let base = u64::from(error_bits + 1) << PLAT_BITS;
    let offset = (ns >> error_bits) & (PLAT_VAL - 1);
    ((base + offset) as usize).min(BUCKETS - 1)
}

/// The range `[low, high)` of latencies (ns) bucket `index` holds.
pub fn bucket_range(index: usize) -> (u64, u64) {
    let i = index as u64;
    if i < 2 * PLAT_VAL {
        return (i, i + 1);
    }
    let error_bits = (i >> PLAT_BITS) - 1;
    let low = (1u64 << (error_bits + u64::from(PLAT_BITS))) + (i % PLAT_VAL) * (1 << error_bits);
    (low, low + (1 << error_bits))
}

/// The value fio shows for bucket `index` (its `plat_idx_to_val`: the middle of the range).
pub fn bucket_value(index: usize) -> u64 {
    let (low, high) = bucket_range(index);
    if high - low == 1 {
        low
    } else {
        low + (high - low) / 2
    }
}

/// The non-empty buckets of `samples`: (bucket index, count), by index.
pub fn histogram(samples: &[u32]) -> Vec<(usize, u64)> {
    let mut counts = vec![0u64; BUCKETS];
    for &s in samples {
        counts[bucket_index(u64::from(s))] += 1;
    }
    counts.into_iter().enumerate().filter(|&(_, c)| c > 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_hold_their_values() {
        let mut expected_low = 0;
        for i in 0..BUCKETS {
            let (low, high) = bucket_range(i);
            assert_eq!(low, expected_low, "bucket {i}");
            assert!(high > low);
            assert_eq!(bucket_index(low), i);
            assert_eq!(bucket_index(high - 1), i);
            expected_low = high;
        }
        // The last bucket also takes everything beyond it.
        assert_eq!(bucket_index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn bucket_values_match_fio_json_plus_keys() {
        // Keys of a real `fio --output-format=json+` clat_ns "bins" (fio 3.33): the middle of
        // buckets 512 ns wide (32768..65536) and 256 ns wide (16384..32768).
        for v in [31616u64, 38656, 39168, 40192, 40704, 42240, 56576, 112128] {
            assert_eq!(bucket_value(bucket_index(v)), v, "{v}");
        }
        assert_eq!(bucket_value(100), 100);
    }

    #[test]
    fn summary_and_percentiles() {
        let mut samples: Vec<u32> = (1..=1000).collect();
        let s = summarize(&samples);
        assert_eq!((s.count, s.min, s.max), (1000, 1, 1000));
        assert!((s.mean - 500.5).abs() < 1e-9);
        assert!((s.stddev - 288.8194360957494).abs() < 1e-6);
        samples.reverse();
        samples.sort_unstable();
        assert_eq!(percentile(&samples, 50.0), 500);
        assert_eq!(percentile(&samples, 99.0), 990);
        assert_eq!(percentile(&samples, 99.99), 1000);
        assert_eq!(percentile(&samples, 1.0), 10);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(summarize(&[7]).stddev, 0.0);
        let h = histogram(&samples);
        assert_eq!(h.iter().map(|&(_, c)| c).sum::<u64>(), 1000);
        assert!(h.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
