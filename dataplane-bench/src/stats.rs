//! Order statistics over samples.

/// Median (upper middle for an even count); zero for no samples.
pub fn median<T: Ord + Copy + Default>(samples: &mut [T]) -> T {
    percentile(samples, 50.0)
}

/// Nearest-rank percentile, `p` in 0..=100; zero for no samples.
pub fn percentile<T: Ord + Copy + Default>(samples: &mut [T], p: f64) -> T {
    if samples.is_empty() {
        return T::default();
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v = vec![5, 1, 4, 2, 3];
        assert_eq!(median(&mut v), 3);
        assert_eq!(percentile(&mut v, 99.0), 5);
        assert_eq!(percentile(&mut v, 0.0), 1);
        assert_eq!(median::<u32>(&mut []), 0);
    }
}
