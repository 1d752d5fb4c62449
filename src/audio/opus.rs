//! Opus for browser calls, over the system libopus (`opusic-sys`). The codec runs at 8 kHz on
//! our side: libopus resamples to and from its 48 kHz internally (its own band-limited
//! resampler in the decoder, SILK narrowband in the encoder), so the phone path's μ-law 8 kHz
//! meets the browser's Opus with no resampler of ours in between.

use std::ptr::NonNull;

use opusic_sys as ffi;

/// Our side's sample rate: the phone path's.
pub const RATE: i32 = 8000;
/// One 20 ms frame at [`RATE`].
pub const FRAME_SAMPLES: usize = 160;
/// RTP clock ticks of one 20 ms frame (Opus's RTP clock is always 48 kHz).
pub const FRAME_TICKS: u64 = 960;
/// The longest Opus packet (120 ms) at [`RATE`].
const MAX_DECODED: usize = 960;
/// Encoder complexity (libopus defaults to 10). Narrowband phone speech gains little from the
/// top settings, and encoding is most of a browser call's CPU: 5 halves it (74–81 → 37–41 µs
/// a frame, `cargo bench --bench webrtc -- --micro`).
const COMPLEXITY: i32 = 5;

#[derive(Debug, thiserror::Error)]
#[error("opus: {0}")]
pub struct OpusError(String);

fn error(code: i32) -> OpusError {
    // SAFETY: opus_strerror returns a pointer to a static NUL-terminated string for any code.
    let text = unsafe { std::ffi::CStr::from_ptr(ffi::opus_strerror(code)) };
    OpusError(text.to_string_lossy().into_owned())
}

/// A mono VoIP encoder fed 20 ms frames of 8 kHz PCM.
pub struct Encoder(NonNull<ffi::OpusEncoder>);

// SAFETY: the state is owned exclusively and libopus keeps no thread affinity.
unsafe impl Send for Encoder {}

impl Encoder {
    pub fn new() -> Result<Self, OpusError> {
        let mut err = 0;
        // SAFETY: valid arguments; the result is checked for NULL below.
        let st = unsafe { ffi::opus_encoder_create(RATE, 1, ffi::OPUS_APPLICATION_VOIP, &mut err) };
        let enc = match NonNull::new(st) {
            Some(p) if err == ffi::OPUS_OK => Self(p),
            _ => return Err(error(err)),
        };
        // SAFETY: a valid encoder state and a request that takes one int argument.
        let set = unsafe {
            ffi::opus_encoder_ctl(enc.0.as_ptr(), ffi::OPUS_SET_COMPLEXITY_REQUEST, COMPLEXITY)
        };
        if set != ffi::OPUS_OK {
            return Err(error(set));
        }
        Ok(enc)
    }

    /// Encodes one frame (`pcm.len()` must be a valid Opus frame size, e.g. 160) into `out`.
    pub fn encode(&mut self, pcm: &[i16], out: &mut Vec<u8>) -> Result<(), OpusError> {
        out.resize(400, 0);
        // SAFETY: pcm and out are valid for the lengths passed; the state is ours.
        let n = unsafe {
            ffi::opus_encode(
                self.0.as_ptr(),
                pcm.as_ptr(),
                pcm.len() as i32,
                out.as_mut_ptr(),
                out.len() as i32,
            )
        };
        if n < 0 {
            return Err(error(n));
        }
        out.truncate(n as usize);
        Ok(())
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // SAFETY: created by opus_encoder_create and destroyed once.
        unsafe { ffi::opus_encoder_destroy(self.0.as_ptr()) }
    }
}

/// A mono decoder producing 8 kHz PCM (stereo streams are downmixed by libopus).
pub struct Decoder {
    st: NonNull<ffi::OpusDecoder>,
    pcm: Vec<i16>,
}

// SAFETY: as for the encoder.
unsafe impl Send for Decoder {}

impl Decoder {
    pub fn new() -> Result<Self, OpusError> {
        let mut err = 0;
        // SAFETY: valid arguments; the result is checked for NULL below.
        let st = unsafe { ffi::opus_decoder_create(RATE, 1, &mut err) };
        match NonNull::new(st) {
            Some(st) if err == ffi::OPUS_OK => Ok(Self {
                st,
                pcm: vec![0; MAX_DECODED],
            }),
            _ => Err(error(err)),
        }
    }

    /// Decodes one packet; the samples are valid until the next call.
    pub fn decode(&mut self, packet: &[u8]) -> Result<&[i16], OpusError> {
        // SAFETY: packet and the output buffer are valid for the lengths passed.
        let n = unsafe {
            ffi::opus_decode(
                self.st.as_ptr(),
                packet.as_ptr(),
                packet.len() as i32,
                self.pcm.as_mut_ptr(),
                MAX_DECODED as i32,
                0,
            )
        };
        if n < 0 {
            return Err(error(n));
        }
        Ok(&self.pcm[..n as usize])
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: created by opus_decoder_create and destroyed once.
        unsafe { ffi::opus_decoder_destroy(self.st.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tone_survives_an_opus_round_trip() {
        let mut enc = Encoder::new().expect("encoder");
        let mut dec = Decoder::new().expect("decoder");
        let mut packet = Vec::new();
        let mut energy_in = 0f64;
        let mut energy_out = 0f64;
        for f in 0..50 {
            let pcm: Vec<i16> = (0..FRAME_SAMPLES)
                .map(|i| {
                    let t = (f * FRAME_SAMPLES + i) as f64 / RATE as f64;
                    (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
                })
                .collect();
            enc.encode(&pcm, &mut packet).expect("encode");
            assert!(!packet.is_empty() && packet.len() < 400);
            let out = dec.decode(&packet).expect("decode");
            assert_eq!(out.len(), FRAME_SAMPLES);
            if f >= 10 {
                energy_in += pcm.iter().map(|&s| (s as f64).powi(2)).sum::<f64>();
                energy_out += out.iter().map(|&s| (s as f64).powi(2)).sum::<f64>();
            }
        }
        let ratio = energy_out / energy_in;
        assert!((0.5..2.0).contains(&ratio), "energy ratio {ratio}");
    }
}
