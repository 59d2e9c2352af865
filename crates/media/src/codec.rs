//! H.264 (openh264, constrained baseline) and Opus (48 kHz mono, in-band FEC, DTX) behind
//! small types that speak [`I420Frame`] and PCM.

use openh264::decoder::Decoder as H264Dec;
use openh264::encoder::{
    BitRate, Complexity, Encoder as H264Enc, EncoderConfig, FrameRate, FrameType, IntraFramePeriod,
    Profile, RateControlMode, UsageType,
};
use openh264::formats::{YUVSlices, YUVSource};
use openh264::OpenH264API;

use crate::frame::{I420Frame, AUDIO_FRAME_SAMPLES, AUDIO_RATE};

/// Codec failures.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("H.264: {0}")]
    H264(String),
    #[error("Opus: {0}")]
    Opus(#[from] opus::Error),
    #[error("picture size {0}x{1} is not supported (must be even, at most 3840 on a side)")]
    BadSize(usize, usize),
}

pub type Result<T> = std::result::Result<T, CodecError>;

fn h264_err(e: openh264::Error) -> CodecError {
    CodecError::H264(e.to_string())
}

/// One encoded H.264 access unit in Annex-B form.
#[derive(Debug, Clone)]
pub struct EncodedVideo {
    pub data: Vec<u8>,
    pub keyframe: bool,
}

/// Constrained-baseline H.264 encoder with a bitrate that can change between frames.
pub struct VideoEncoder {
    enc: H264Enc,
    bitrate_bps: u32,
    fps: f32,
    initialised: bool,
}

impl VideoEncoder {
    pub fn new(bitrate_bps: u32, fps: f32) -> Result<Self> {
        let cfg = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bitrate_bps))
            .max_frame_rate(FrameRate::from_hz(fps))
            .rate_control_mode(RateControlMode::Bitrate)
            .profile(Profile::Baseline)
            // Keyframes come on request (PLI); a slow periodic one bounds recovery time for
            // receivers whose request got lost.
            .intra_frame_period(IntraFramePeriod::from_num_frames((fps * 10.0) as u32))
            .usage_type(UsageType::CameraVideoRealTime)
            // openh264 only holds a bitrate in RC_BITRATE_MODE when it may skip frames.
            .skip_frames(true)
            .num_threads(1)
            .complexity(Complexity::Low);
        let enc = H264Enc::with_api_config(OpenH264API::from_source(), cfg).map_err(h264_err)?;
        Ok(VideoEncoder {
            enc,
            bitrate_bps,
            fps,
            initialised: false,
        })
    }

    pub fn bitrate_bps(&self) -> u32 {
        self.bitrate_bps
    }

    pub fn fps(&self) -> f32 {
        self.fps
    }

    /// Makes the next frame an IDR (answer to a PLI/FIR).
    pub fn force_keyframe(&mut self) {
        self.enc.force_intra_frame();
    }

    /// Changes the target bitrate from the next frame on.
    pub fn set_bitrate(&mut self, bps: u32) -> Result<()> {
        let bps = bps.clamp(30_000, 20_000_000);
        if bps == self.bitrate_bps {
            return Ok(());
        }
        if self.initialised {
            raw::set_bitrate(&mut self.enc, self.bitrate_bps as i32, bps as i32)
                .map_err(|rc| CodecError::H264(format!("SetOption(bitrate) returned {rc}")))?;
        } else {
            *self = VideoEncoder::new(bps, self.fps)?;
        }
        self.bitrate_bps = bps;
        Ok(())
    }

    /// Encodes one picture. `None` when the rate controller skipped it.
    pub fn encode(&mut self, pic: &I420Frame) -> Result<Option<EncodedVideo>> {
        if !pic.width.is_multiple_of(2)
            || !pic.height.is_multiple_of(2)
            || pic.width > 3840
            || pic.height > 3840
        {
            return Err(CodecError::BadSize(pic.width, pic.height));
        }
        let (cw, _) = I420Frame::chroma_size(pic.width, pic.height);
        let yuv = YUVSlices::new(
            (&pic.y, &pic.u, &pic.v),
            (pic.width, pic.height),
            (pic.width, cw, cw),
        );
        let bs = self.enc.encode(&yuv).map_err(h264_err)?;
        self.initialised = true;
        let keyframe = bs.frame_type() == FrameType::IDR;
        let data = bs.to_vec();
        if data.is_empty() {
            return Ok(None);
        }
        Ok(Some(EncodedVideo { data, keyframe }))
    }
}

/// The one place that reaches into openh264's C API: there is no safe bitrate setter.
mod raw {
    #[allow(unsafe_code)]
    pub fn set_bitrate(
        enc: &mut openh264::encoder::Encoder,
        cur_bps: i32,
        new_bps: i32,
    ) -> Result<(), i32> {
        use openh264_sys2::{
            SBitrateInfo, ENCODER_OPTION_BITRATE, ENCODER_OPTION_MAX_BITRATE, SPATIAL_LAYER_0,
            SPATIAL_LAYER_ALL,
        };
        let mut max = SBitrateInfo {
            iLayer: SPATIAL_LAYER_0,
            iBitrate: new_bps,
        };
        let mut tgt = SBitrateInfo {
            iLayer: SPATIAL_LAYER_ALL,
            iBitrate: new_bps,
        };
        // openh264 refuses a target above the maximum: raise the maximum first, lower the
        // target first.
        let order = if new_bps > cur_bps {
            [
                (ENCODER_OPTION_MAX_BITRATE, &mut max as *mut SBitrateInfo),
                (ENCODER_OPTION_BITRATE, &mut tgt as *mut SBitrateInfo),
            ]
        } else {
            [
                (ENCODER_OPTION_BITRATE, &mut tgt as *mut SBitrateInfo),
                (ENCODER_OPTION_MAX_BITRATE, &mut max as *mut SBitrateInfo),
            ]
        };
        for (opt, info) in order {
            // SAFETY: the caller has encoded at least one frame, so the encoder is
            // initialised; `info` points to a live SBitrateInfo, the type SetOption expects
            // for both options, and outlives the call.
            let rc = unsafe { enc.raw_api().set_option(opt, info.cast()) };
            if rc != 0 {
                return Err(rc);
            }
        }
        Ok(())
    }
}

/// H.264 decoder producing tightly packed I420 pictures.
pub struct VideoDecoder {
    dec: H264Dec,
}

impl VideoDecoder {
    pub fn new() -> Result<Self> {
        Ok(VideoDecoder {
            dec: H264Dec::new().map_err(h264_err)?,
        })
    }

    /// Decodes one Annex-B access unit. `Ok(None)` when it produced no picture (parameter
    /// sets only). An error means the stream is damaged: ask for a keyframe.
    pub fn decode(&mut self, access_unit: &[u8]) -> Result<Option<I420Frame>> {
        match self.dec.decode(access_unit).map_err(h264_err)? {
            None => Ok(None),
            Some(yuv) => {
                let (w, h) = yuv.dimensions();
                let (sy, su, sv) = yuv.strides();
                Ok(Some(I420Frame::from_strided(
                    w,
                    h,
                    [yuv.y(), yuv.u(), yuv.v()],
                    [sy, su, sv],
                )))
            }
        }
    }
}

/// Opus encoder for 20 ms mono frames at 48 kHz, with in-band FEC and DTX.
pub struct AudioEncoder {
    enc: opus::Encoder,
    buf: Vec<u8>,
}

impl AudioEncoder {
    pub fn new(bitrate_bps: i32) -> Result<Self> {
        let mut enc =
            opus::Encoder::new(AUDIO_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        enc.set_bitrate(opus::Bitrate::Bits(bitrate_bps))?;
        enc.set_inband_fec(true)?;
        // FEC is only produced when the encoder expects loss.
        enc.set_packet_loss_perc(10)?;
        enc.set_dtx(true)?;
        enc.set_complexity(7)?;
        Ok(AudioEncoder {
            enc,
            buf: vec![0; 1500],
        })
    }

    /// Changes the bitrate (bits per second) from the next frame.
    pub fn set_bitrate(&mut self, bitrate_bps: i32) -> Result<()> {
        Ok(self.enc.set_bitrate(opus::Bitrate::Bits(bitrate_bps))?)
    }

    /// Tells the encoder the loss it should protect against (0..=100 %).
    pub fn set_expected_loss(&mut self, pct: i32) -> Result<()> {
        Ok(self.enc.set_packet_loss_perc(pct.clamp(0, 100))?)
    }

    /// Encodes 960 samples. Returns the packet; with DTX, packets of ≤ 2 bytes are silence
    /// markers that may be skipped on the wire.
    pub fn encode(&mut self, pcm: &[i16]) -> Result<Vec<u8>> {
        let n = self.enc.encode(pcm, &mut self.buf)?;
        Ok(self.buf[..n].to_vec())
    }
}

/// Opus decoder with loss concealment and FEC recovery.
pub struct AudioDecoder {
    dec: opus::Decoder,
}

impl AudioDecoder {
    pub fn new() -> Result<Self> {
        Ok(AudioDecoder {
            dec: opus::Decoder::new(AUDIO_RATE, opus::Channels::Mono)?,
        })
    }

    /// Decodes one packet into `AUDIO_FRAME_SAMPLES`-or-more samples.
    pub fn decode(&mut self, packet: &[u8]) -> Result<Vec<i16>> {
        let mut out = vec![0i16; 5760];
        let n = self.dec.decode(packet, &mut out, false)?;
        out.truncate(n);
        Ok(out)
    }

    /// Recovers a lost 20 ms frame from the FEC data in the packet that followed it.
    pub fn recover(&mut self, next_packet: &[u8]) -> Result<Vec<i16>> {
        let mut out = vec![0i16; AUDIO_FRAME_SAMPLES];
        let n = self.dec.decode(next_packet, &mut out, true)?;
        out.truncate(n);
        Ok(out)
    }

    /// Conceals one lost 20 ms frame.
    pub fn conceal(&mut self) -> Result<Vec<i16>> {
        let mut out = vec![0i16; AUDIO_FRAME_SAMPLES];
        let n = self.dec.decode(&[], &mut out, false)?;
        out.truncate(n);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stamp::Stamp;
    use crate::synthetic::{detect_tone, psnr_y, test_picture, SyntheticTone};

    #[test]
    fn h264_round_trip_keeps_stamps() {
        let mut enc = VideoEncoder::new(800_000, 15.0).unwrap();
        let mut dec = VideoDecoder::new().unwrap();
        let mut verified = 0;
        let mut encoded = 0;
        for n in 0..30u32 {
            let s = Stamp {
                frame: n,
                time_us: n * 1000,
                site_tag: 9,
            };
            let pic = test_picture(640, 360, s);
            let Some(au) = enc.encode(&pic).unwrap() else {
                assert!(n > 0, "the first frame is never skipped");
                continue;
            };
            if n == 0 {
                assert!(au.keyframe);
            }
            if n == 10 {
                enc.set_bitrate(300_000).unwrap();
            }
            if n == 19 {
                enc.force_keyframe();
            }
            if n == 20 {
                assert!(au.keyframe, "forced keyframe");
            }
            encoded += 1;
            let out = dec
                .decode(&au.data)
                .unwrap()
                .expect("a picture per access unit");
            assert_eq!((out.width, out.height), (640, 360));
            if Stamp::read(&out) == Some(s) {
                verified += 1;
            }
            assert!(psnr_y(&pic, &out) > 25.0, "frame {n} psnr");
        }
        assert_eq!(verified, encoded, "every decoded frame carries its stamp");
        assert!(
            encoded >= 25,
            "at 800 kbit/s few frames are skipped ({encoded}/30)"
        );
    }

    /// A picture carrying probe padding (an SEI the server normally removes) decodes to the
    /// same picture as without it: a decoder given it by a server that does not know it skips it.
    #[test]
    fn probe_padding_does_not_change_the_picture() {
        use diemcau_protocol::padding::with_padding;
        let mut enc = VideoEncoder::new(300_000, 15.0).unwrap();
        let (mut plain, mut padded) = (VideoDecoder::new().unwrap(), VideoDecoder::new().unwrap());
        let mut compared = 0;
        for n in 0..10u32 {
            let s = Stamp {
                frame: n,
                time_us: n * 1000,
                site_tag: 3,
            };
            let Some(au) = enc.encode(&test_picture(320, 180, s)).unwrap() else {
                continue;
            };
            let a = plain.decode(&au.data).unwrap().expect("a picture");
            let b = padded
                .decode(&with_padding(&au.data, 3000))
                .unwrap()
                .expect("a picture with padding");
            assert_eq!((a.y, a.u, a.v), (b.y, b.u, b.v), "frame {n}");
            compared += 1;
        }
        assert!(compared >= 8, "{compared}");
    }

    #[test]
    fn decoder_rejects_garbage_without_panicking() {
        let mut dec = VideoDecoder::new().unwrap();
        let _ = dec.decode(&[0, 0, 0, 1, 0x65, 0xff, 0x00, 0x13]);
        let _ = dec.decode(&[1, 2, 3]);
    }

    #[test]
    fn opus_round_trip_keeps_tone_steps_and_recovers_with_fec() {
        let mut src = SyntheticTone::new();
        let mut enc = AudioEncoder::new(32_000).unwrap();
        let mut dec = AudioDecoder::new().unwrap();
        let packets: Vec<Vec<u8>> = (0..50)
            .map(|_| enc.encode(&src.frame_now().samples).unwrap())
            .collect();
        let mut matched = 0;
        for (k, p) in packets.iter().enumerate() {
            if k == 30 {
                // Lose packet 30; recover it from 31's FEC.
                let rec = dec.recover(&packets[31]).unwrap();
                assert_eq!(rec.len(), AUDIO_FRAME_SAMPLES);
                continue;
            }
            let pcm = dec.decode(p).unwrap();
            assert_eq!(pcm.len(), AUDIO_FRAME_SAMPLES);
            if detect_tone(&pcm) == Some(k as u32 % crate::synthetic::TONE_STEPS) {
                matched += 1;
            }
        }
        assert!(matched >= 45, "matched {matched} of 49 tone frames");
        assert_eq!(dec.conceal().unwrap().len(), AUDIO_FRAME_SAMPLES);
    }
}
