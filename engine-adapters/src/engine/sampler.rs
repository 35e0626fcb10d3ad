//! Token sampling from logits: greedy (argmax, lowest id on ties) or
//! temperature sampling driven by a seeded SplitMix64, so a given seed and
//! logits always give the same tokens.

use serde::{Deserialize, Serialize};

use super::error::EngineError;
use super::rng::SplitMix64;

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Sampling {
    /// The most likely token (lowest id among equals).
    Greedy,
    /// A draw from `softmax(logits / temperature)`.
    Temperature {
        /// Finite and > 0; lower is closer to greedy.
        temperature: f32,
        /// Seed of the draws.
        seed: u64,
    },
}

/// A sampler: [`Sampling`] plus its random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: SplitMix64,
    probs: Vec<f32>,
}

impl Sampler {
    /// A sampler for `sampling`; rejects a non-finite or non-positive
    /// temperature.
    pub fn new(sampling: Sampling) -> Result<Self, EngineError> {
        let seed = match sampling {
            Sampling::Greedy => 0,
            Sampling::Temperature { temperature, seed } => {
                if !temperature.is_finite() || temperature <= 0.0 {
                    return Err(EngineError::InvalidSampling(format!(
                        "temperature {temperature} must be finite and > 0"
                    )));
                }
                seed
            }
        };
        Ok(Self {
            sampling,
            rng: SplitMix64::new(seed),
            probs: Vec::new(),
        })
    }

    /// Picks a token id from `logits` (one value per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, EngineError> {
        let best = argmax(logits)?;
        let Sampling::Temperature { temperature, .. } = self.sampling else {
            return Ok(best);
        };
        let max = logits[best as usize];
        if !max.is_finite() {
            // All -inf, or a +inf that takes all the mass.
            return Ok(best);
        }
        self.probs.clear();
        let mut sum = 0.0f64;
        for &l in logits {
            let p = ((l - max) / temperature).exp();
            sum += f64::from(p);
            self.probs.push(p);
        }
        let target = f64::from(self.rng.next_f32()) * sum;
        let mut acc = 0.0f64;
        for (i, &p) in self.probs.iter().enumerate() {
            acc += f64::from(p);
            if acc > target {
                return Ok(i as u32);
            }
        }
        // Rounding left the target at the very end: the last likely token.
        Ok(self.probs.iter().rposition(|&p| p > 0.0).unwrap_or(best as usize) as u32)
    }
}

/// Index of the largest logit (lowest index among equals); an error for
/// empty logits or any NaN.
pub fn argmax(logits: &[f32]) -> Result<u32, EngineError> {
    if logits.is_empty() {
        return Err(EngineError::BadLogits("no logits".into()));
    }
    if let Some(i) = logits.iter().position(|l| l.is_nan()) {
        return Err(EngineError::BadLogits(format!("logit {i} is NaN")));
    }
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(Sampling::Greedy).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0]).unwrap(), 1);
        assert!(s.sample(&[]).is_err());
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
    }

    #[test]
    fn temperature_is_deterministic_per_seed_and_follows_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let draw = |seed| {
            let mut s = Sampler::new(Sampling::Temperature { temperature: 1.0, seed }).unwrap();
            (0..4000).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        let a = draw(5);
        assert_eq!(a, draw(5));
        assert_ne!(a, draw(6));
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for (tok, &l) in logits.iter().enumerate() {
            let expected = f64::from(l).exp() / z;
            let got = a.iter().filter(|&&t| t as usize == tok).count() as f64 / a.len() as f64;
            assert!((got - expected).abs() < 0.03, "token {tok}: {got} vs {expected}");
        }
        // A tiny temperature is greedy.
        let mut cold = Sampler::new(Sampling::Temperature {
            temperature: 1e-4,
            seed: 1,
        })
        .unwrap();
        assert!((0..100).all(|_| cold.sample(&logits).unwrap() == 2));
    }

    #[test]
    fn bad_temperatures_are_rejected() {
        for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(
                Sampler::new(Sampling::Temperature {
                    temperature: t,
                    seed: 0
                })
                .is_err()
            );
        }
    }
}
