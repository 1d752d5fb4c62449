//! 24 kHz → 8 kHz for OpenAI speech (`pcm` is 24 kHz s16le; the phone takes 8 kHz μ-law).
//!
//! Hand-written on purpose: the ratio is exactly 3, so a low-pass FIR evaluated only at every
//! third input sample (a polyphase decimator) is all a real resampler would do here, in a few
//! lines, streaming across arbitrary chunk edges (even mid-sample) with no allocation per
//! chunk beyond the output. The filter is a Blackman-windowed sinc: flat to ~3.2 kHz (the
//! phone band), ≥ 70 dB down above 4.4 kHz, so content above the new Nyquist frequency is
//! removed instead of folding back as aliases (which sample dropping would do).

use super::mulaw;

/// Filter length: with a Blackman window the transition band is ~5.5 / TAPS of the input
/// rate (~1.1 kHz at 24 kHz).
const TAPS: usize = 120;
/// Cutoff as a fraction of the input rate (3.8 kHz at 24 kHz).
const CUTOFF: f64 = 3800.0 / 24000.0;
const FACTOR: usize = 3;

/// A streaming 3:1 decimator from 24 kHz s16le bytes to 8 kHz μ-law.
pub struct Decimate24To8 {
    taps: [f32; TAPS],
    /// The last TAPS input samples, twice over so a window is always one contiguous slice.
    history: [f32; 2 * TAPS],
    pos: usize,
    phase: usize,
    /// A byte of a sample split across chunks.
    odd: Option<u8>,
}

impl Default for Decimate24To8 {
    fn default() -> Self {
        Self::new()
    }
}

impl Decimate24To8 {
    pub fn new() -> Self {
        let mut taps = [0f32; TAPS];
        let m = (TAPS - 1) as f64;
        let mut sum = 0.0;
        for (i, t) in taps.iter_mut().enumerate() {
            let x = i as f64 - m / 2.0;
            let sinc = if x == 0.0 {
                2.0 * CUTOFF
            } else {
                (2.0 * std::f64::consts::PI * CUTOFF * x).sin() / (std::f64::consts::PI * x)
            };
            let w = 0.42 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / m).cos()
                + 0.08 * (4.0 * std::f64::consts::PI * i as f64 / m).cos();
            let v = sinc * w;
            sum += v;
            *t = v as f32;
        }
        // Unity gain at DC.
        for t in &mut taps {
            *t /= sum as f32;
        }
        Self {
            taps,
            history: [0.0; 2 * TAPS],
            pos: 0,
            phase: 0,
            odd: None,
        }
    }

    /// Feeds 24 kHz s16le bytes; appends the 8 kHz μ-law they complete to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let mut rest = bytes;
        if let Some(lo) = self.odd.take() {
            let Some((&hi, r)) = rest.split_first() else {
                self.odd = Some(lo);
                return;
            };
            self.sample(i16::from_le_bytes([lo, hi]), out);
            rest = r;
        }
        let mut pairs = rest.chunks_exact(2);
        for p in &mut pairs {
            self.sample(i16::from_le_bytes([p[0], p[1]]), out);
        }
        if let [b] = pairs.remainder() {
            self.odd = Some(*b);
        }
    }

    fn sample(&mut self, s: i16, out: &mut Vec<u8>) {
        let v = s as f32;
        self.history[self.pos] = v;
        self.history[self.pos + TAPS] = v;
        self.pos = (self.pos + 1) % TAPS;
        self.phase += 1;
        if self.phase < FACTOR {
            return;
        }
        self.phase = 0;
        // history[pos..pos+TAPS] is oldest → newest; the filter is symmetric.
        let window = &self.history[self.pos..self.pos + TAPS];
        let acc: f32 = window.iter().zip(&self.taps).map(|(x, h)| x * h).sum();
        out.push(mulaw::encode(acc.round().clamp(-32768.0, 32767.0) as i16));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone_24k(hz: f64, n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let s = 8000.0 * (2.0 * std::f64::consts::PI * hz * i as f64 / 24000.0).sin();
                (s.round() as i16).to_le_bytes()
            })
            .collect()
    }

    fn rms(mu: &[u8]) -> f64 {
        let s: f64 = mu.iter().map(|&b| (mulaw::decode(b) as f64).powi(2)).sum();
        (s / mu.len() as f64).sqrt()
    }

    /// Goertzel power of `hz` in 8 kHz μ-law, normalized to amplitude.
    fn amplitude_at(mu: &[u8], hz: f64) -> f64 {
        let w = 2.0 * std::f64::consts::PI * hz / 8000.0;
        let (mut s1, mut s2) = (0.0, 0.0);
        for &b in mu {
            let s = mulaw::decode(b) as f64 + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s;
        }
        let p = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
        2.0 * p.sqrt() / mu.len() as f64
    }

    fn run(bytes: &[u8], chunk: usize) -> Vec<u8> {
        let mut d = Decimate24To8::new();
        let mut out = Vec::new();
        for c in bytes.chunks(chunk) {
            d.push(c, &mut out);
        }
        out
    }

    #[test]
    fn a_3khz_tone_passes_with_its_pitch() {
        let out = run(&tone_24k(3000.0, 24000), 4801);
        assert_eq!(out.len(), 8000, "one output sample per three input samples");
        // Skip the filter's warm-up.
        let steady = &out[200..];
        let a = amplitude_at(steady, 3000.0);
        assert!(a > 7000.0 && a < 8800.0, "3 kHz amplitude {a}");
        // Its energy is at 3 kHz, not elsewhere.
        assert!(amplitude_at(steady, 1000.0) < 200.0);
        assert!(amplitude_at(steady, 2000.0) < 200.0);
    }

    #[test]
    fn a_6khz_tone_is_attenuated_not_aliased() {
        let out = run(&tone_24k(6000.0, 24000), 333);
        let steady = &out[200..];
        // Sample dropping would fold 6 kHz onto 2 kHz at full strength.
        let alias = amplitude_at(steady, 2000.0);
        assert!(alias < 100.0, "alias at 2 kHz: {alias}");
        assert!(rms(steady) < 100.0, "rms {}", rms(steady));
    }

    #[test]
    fn chunk_edges_do_not_matter() {
        let pcm = tone_24k(440.0, 9000);
        assert_eq!(run(&pcm, 7), run(&pcm, pcm.len()));
    }
}
