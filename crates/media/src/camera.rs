//! Cameras through nokhwa (V4L2 on Linux, Media Foundation on Windows), behind
//! [`VideoSource`].
//!
//! Each camera lives on a thread of its own that opens it, streams and converts frames to
//! I420; [`Camera::read`] takes frames from that thread (nokhwa's own threaded camera
//! deadlocks on Media Foundation, nokhwa #165). Conversions from the formats webcams deliver
//! (MJPEG, YUYV, NV12, RGB/BGR, grey) are plain functions here, tested against known pixels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
};

use crate::frame::{now_us, I420Frame, VideoFrame};
use crate::source::{SourceError, VideoSource};

/// Pixel layouts a camera can deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Mjpeg,
    Yuyv,
    Nv12,
    Rgb,
    Bgr,
    Gray,
}

impl PixelFormat {
    fn from_nokhwa(f: FrameFormat) -> Self {
        match f {
            FrameFormat::MJPEG => PixelFormat::Mjpeg,
            FrameFormat::YUYV => PixelFormat::Yuyv,
            FrameFormat::NV12 => PixelFormat::Nv12,
            FrameFormat::GRAY => PixelFormat::Gray,
            FrameFormat::RAWRGB => PixelFormat::Rgb,
            FrameFormat::RAWBGR => PixelFormat::Bgr,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Mjpeg => "MJPEG",
            PixelFormat::Yuyv => "YUYV",
            PixelFormat::Nv12 => "NV12",
            PixelFormat::Rgb => "RGB",
            PixelFormat::Bgr => "BGR",
            PixelFormat::Gray => "GRAY",
        }
    }
}

/// One mode a camera offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub format: PixelFormat,
}

/// Picks the mode closest to the wanted size and rate: the smallest size covering the wanted
/// one (else the largest), then the rate nearest the wanted one, then formats cheap to convert
/// (NV12, YUYV before MJPEG before RGB).
pub fn pick_mode(modes: &[Mode], width: u32, height: u32, fps: u32) -> Option<Mode> {
    let cost = |f: PixelFormat| match f {
        PixelFormat::Nv12 => 0,
        PixelFormat::Yuyv => 1,
        PixelFormat::Mjpeg => 2,
        PixelFormat::Rgb | PixelFormat::Bgr => 3,
        PixelFormat::Gray => 4,
    };
    modes.iter().copied().min_by_key(|m| {
        let covers = m.width >= width && m.height >= height;
        let area = u64::from(m.width) * u64::from(m.height);
        // Covering sizes rank by smallest area; others after them by largest area.
        let size_rank = if covers { area } else { u64::MAX / 2 - area };
        (size_rank, m.fps.abs_diff(fps), cost(m.format))
    })
}

/// BT.601 limited-range RGB → YUV.
fn rgb_to_yuv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let (r, g, b) = (i32::from(r), i32::from(g), i32::from(b));
    let y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16;
    let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
    let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
    (
        y.clamp(0, 255) as u8,
        u.clamp(0, 255) as u8,
        v.clamp(0, 255) as u8,
    )
}

/// Interleaved 3-byte pixels (RGB or BGR) to I420; odd sizes are cropped to even.
pub fn rgb_to_i420(data: &[u8], width: usize, height: usize, bgr: bool) -> Option<I420Frame> {
    let (w, h) = (width & !1, height & !1);
    if w == 0 || h == 0 || data.len() < width * height * 3 {
        return None;
    }
    let mut f = I420Frame::black(w, h);
    let cw = w / 2;
    let px = |x: usize, y: usize| {
        let i = (y * width + x) * 3;
        if bgr {
            (data[i + 2], data[i + 1], data[i])
        } else {
            (data[i], data[i + 1], data[i + 2])
        }
    };
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = px(x, y);
            f.y[y * w + x] = rgb_to_yuv(r, g, b).0;
        }
    }
    // Chroma from the average colour of each 2x2 block.
    for cy in 0..h / 2 {
        for cx in 0..cw {
            let (mut r, mut g, mut b) = (0u32, 0u32, 0u32);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let (pr, pg, pb) = px(cx * 2 + dx, cy * 2 + dy);
                r += u32::from(pr);
                g += u32::from(pg);
                b += u32::from(pb);
            }
            let (_, u, v) = rgb_to_yuv((r / 4) as u8, (g / 4) as u8, (b / 4) as u8);
            f.u[cy * cw + cx] = u;
            f.v[cy * cw + cx] = v;
        }
    }
    Some(f)
}

/// YUYV (YUY2, 4:2:2 packed) to I420; `stride` is bytes per row (≥ 2·width).
pub fn yuyv_to_i420(data: &[u8], width: usize, height: usize, stride: usize) -> Option<I420Frame> {
    let (w, h) = (width & !1, height & !1);
    if w == 0 || h == 0 || stride < width * 2 || data.len() < stride * (height - 1) + width * 2 {
        return None;
    }
    let mut f = I420Frame::black(w, h);
    let cw = w / 2;
    for y in 0..h {
        let row = &data[y * stride..];
        for x in 0..w {
            f.y[y * w + x] = row[x * 2];
        }
        if y % 2 == 0 {
            let below = &data[(y + 1) * stride..];
            for cx in 0..cw {
                // Average the two rows' chroma (4:2:2 → 4:2:0).
                let avg = |a: u8, b: u8| (u16::from(a) + u16::from(b)).div_ceil(2) as u8;
                f.u[(y / 2) * cw + cx] = avg(row[cx * 4 + 1], below[cx * 4 + 1]);
                f.v[(y / 2) * cw + cx] = avg(row[cx * 4 + 3], below[cx * 4 + 3]);
            }
        }
    }
    Some(f)
}

/// NV12 (Y plane, then interleaved UV at half resolution) to I420.
pub fn nv12_to_i420(data: &[u8], width: usize, height: usize, stride: usize) -> Option<I420Frame> {
    let (w, h) = (width & !1, height & !1);
    let uv_start = stride * height;
    if w == 0 || h == 0 || stride < width || data.len() < uv_start + stride * (height / 2) {
        return None;
    }
    let mut f = I420Frame::black(w, h);
    let cw = w / 2;
    for y in 0..h {
        f.y[y * w..(y + 1) * w].copy_from_slice(&data[y * stride..y * stride + w]);
    }
    for cy in 0..h / 2 {
        let row = &data[uv_start + cy * stride..];
        for cx in 0..cw {
            f.u[cy * cw + cx] = row[cx * 2];
            f.v[cy * cw + cx] = row[cx * 2 + 1];
        }
    }
    Some(f)
}

/// Grey (8-bit luma) to I420 with neutral chroma.
pub fn gray_to_i420(data: &[u8], width: usize, height: usize) -> Option<I420Frame> {
    let (w, h) = (width & !1, height & !1);
    if w == 0 || h == 0 || data.len() < width * height {
        return None;
    }
    let mut f = I420Frame::black(w, h);
    for y in 0..h {
        f.y[y * w..(y + 1) * w].copy_from_slice(&data[y * width..y * width + w]);
    }
    Some(f)
}

/// MJPEG (one JPEG per frame) to I420.
pub fn mjpeg_to_i420(data: &[u8]) -> Option<I420Frame> {
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let opts = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(data, opts);
    let rgb = dec.decode().ok()?;
    let (w, h) = dec.dimensions()?;
    rgb_to_i420(&rgb, w, h, false)
}

/// Converts one camera buffer to I420.
pub fn to_i420(format: PixelFormat, data: &[u8], width: usize, height: usize) -> Option<I420Frame> {
    match format {
        PixelFormat::Mjpeg => mjpeg_to_i420(data),
        // Drivers may pad rows: take the stride from the buffer's length.
        PixelFormat::Yuyv => {
            let stride = (data.len() / height.max(1)).max(width * 2);
            yuyv_to_i420(data, width, height, stride)
        }
        PixelFormat::Nv12 => {
            let rows = height + height / 2;
            let stride = (data.len() / rows.max(1)).max(width);
            nv12_to_i420(data, width, height, stride)
        }
        PixelFormat::Rgb => rgb_to_i420(data, width, height, false),
        PixelFormat::Bgr => rgb_to_i420(data, width, height, true),
        PixelFormat::Gray => gray_to_i420(data, width, height),
    }
}

/// A camera as listed.
#[derive(Debug, Clone)]
pub struct CameraInfo {
    /// The index to pass as `camera:N`.
    pub index: u32,
    pub name: String,
    pub modes: Vec<Mode>,
}

fn nokhwa_err(e: nokhwa::NokhwaError, what: &str) -> SourceError {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if lower.contains("busy") || lower.contains("resource") {
        SourceError::Busy(format!("{what}: {text}"))
    } else if lower.contains("no such") || lower.contains("not found") || lower.contains("open") {
        SourceError::NoDevice(format!("{what}: {text}"))
    } else {
        SourceError::Device(format!("{what}: {text}"))
    }
}

/// Lists cameras with their modes (opening each briefly to ask).
pub fn list_cameras() -> Result<Vec<CameraInfo>, SourceError> {
    let infos = nokhwa::query(ApiBackend::Auto).map_err(|e| nokhwa_err(e, "camera list"))?;
    let mut out = Vec::new();
    for info in infos {
        let CameraIndex::Index(index) = info.index().clone() else {
            continue;
        };
        let modes = nokhwa::Camera::new(
            CameraIndex::Index(index),
            RequestedFormat::new::<RgbFormat>(RequestedFormatType::None),
        )
        .and_then(|mut c| c.compatible_camera_formats())
        .map(|fs| {
            fs.into_iter()
                .map(|f| Mode {
                    width: f.width(),
                    height: f.height(),
                    fps: f.frame_rate(),
                    format: PixelFormat::from_nokhwa(f.format()),
                })
                .collect()
        })
        .unwrap_or_default();
        out.push(CameraInfo {
            index,
            name: info.human_name(),
            modes,
        });
    }
    Ok(out)
}

/// A camera streaming on its own thread.
pub struct Camera {
    name: String,
    mode: Mode,
    frames: Receiver<Result<I420Frame, SourceError>>,
    stop: Arc<AtomicBool>,
}

impl Camera {
    /// Opens camera `index` in the mode closest to `width`x`height` at `fps`.
    pub fn open(index: u32, width: u32, height: u32, fps: u32) -> Result<Self, SourceError> {
        let what = format!("camera:{index}");
        let (tx, frames) = mpsc::sync_channel::<Result<I420Frame, SourceError>>(2);
        let (ready_tx, ready) = mpsc::channel::<Result<(String, Mode), SourceError>>();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_t = stop.clone();
        std::thread::Builder::new()
            .name(format!("camera-{index}"))
            .spawn(move || {
                let opened = (|| {
                    let mut cam = nokhwa::Camera::new(
                        CameraIndex::Index(index),
                        RequestedFormat::new::<RgbFormat>(RequestedFormatType::None),
                    )
                    .map_err(|e| nokhwa_err(e, &what))?;
                    let modes: Vec<(Mode, CameraFormat)> = cam
                        .compatible_camera_formats()
                        .map_err(|e| nokhwa_err(e, &what))?
                        .into_iter()
                        .map(|f| {
                            (
                                Mode {
                                    width: f.width(),
                                    height: f.height(),
                                    fps: f.frame_rate(),
                                    format: PixelFormat::from_nokhwa(f.format()),
                                },
                                f,
                            )
                        })
                        .collect();
                    let plain: Vec<Mode> = modes.iter().map(|(m, _)| *m).collect();
                    let mode = pick_mode(&plain, width, height, fps).ok_or_else(|| {
                        SourceError::UnsupportedFormat(format!("{what}: no usable mode"))
                    })?;
                    let fmt = modes
                        .iter()
                        .find(|(m, _)| *m == mode)
                        .map(|(_, f)| *f)
                        .expect("picked from this list");
                    cam.set_camera_requset(RequestedFormat::new::<RgbFormat>(
                        RequestedFormatType::Exact(fmt),
                    ))
                    .map_err(|e| nokhwa_err(e, &what))?;
                    cam.open_stream().map_err(|e| nokhwa_err(e, &what))?;
                    Ok((cam, mode))
                })();
                let (mut cam, mode) = match opened {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((cam.info().human_name(), mode)));
                while !stop_t.load(Ordering::Relaxed) {
                    let frame = cam
                        .frame()
                        .map_err(|e| SourceError::Disconnected(format!("{what}: {e}")));
                    let converted = frame.and_then(|b| {
                        let res = b.resolution();
                        to_i420(
                            PixelFormat::from_nokhwa(b.source_frame_format()),
                            b.buffer(),
                            res.width() as usize,
                            res.height() as usize,
                        )
                        .ok_or_else(|| {
                            SourceError::UnsupportedFormat(format!("{what}: undecodable frame"))
                        })
                    });
                    let failed = converted.is_err();
                    if tx.send(converted).is_err() || failed {
                        break;
                    }
                }
                let _ = cam.stop_stream();
            })
            .map_err(|e| SourceError::Device(e.to_string()))?;
        let (name, mode) = ready
            .recv()
            .map_err(|_| SourceError::Device("camera thread ended".into()))??;
        Ok(Camera {
            name,
            mode,
            frames,
            stop,
        })
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl VideoSource for Camera {
    fn describe(&self) -> String {
        format!(
            "Camera: {} ({}x{}@{} {})",
            self.name,
            self.mode.width,
            self.mode.height,
            self.mode.fps,
            self.mode.format.name()
        )
    }

    fn size(&self) -> (usize, usize) {
        (
            (self.mode.width & !1) as usize,
            (self.mode.height & !1) as usize,
        )
    }

    fn fps(&self) -> u32 {
        self.mode.fps.max(1)
    }

    fn read(&mut self) -> Result<VideoFrame, SourceError> {
        match self.frames.recv_timeout(Duration::from_secs(3)) {
            Ok(Ok(picture)) => Ok(VideoFrame {
                picture,
                captured_us: now_us(),
            }),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Err(SourceError::Disconnected(format!(
                "{}: no picture for 3 s",
                self.name
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                Err(SourceError::Disconnected(self.name.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(width: u32, height: u32, fps: u32, format: PixelFormat) -> Mode {
        Mode {
            width,
            height,
            fps,
            format,
        }
    }

    #[test]
    fn mode_choice_prefers_covering_size_then_rate_then_cheap_format() {
        use PixelFormat::*;
        let modes = [
            m(1920, 1080, 30, Mjpeg),
            m(1280, 720, 30, Mjpeg),
            m(1280, 720, 10, Yuyv),
            m(1280, 720, 30, Yuyv),
            m(640, 360, 30, Yuyv),
            m(320, 240, 30, Yuyv),
        ];
        assert_eq!(
            pick_mode(&modes, 1280, 720, 30),
            Some(m(1280, 720, 30, Yuyv))
        );
        assert_eq!(
            pick_mode(&modes, 1280, 720, 15),
            Some(m(1280, 720, 10, Yuyv))
        );
        assert_eq!(pick_mode(&modes, 640, 360, 15), Some(m(640, 360, 30, Yuyv)));
        // Nothing covers 4K: the largest there is.
        assert_eq!(
            pick_mode(&modes, 3840, 2160, 30),
            Some(m(1920, 1080, 30, Mjpeg))
        );
        assert_eq!(pick_mode(&[], 640, 360, 15), None);
    }

    #[test]
    fn rgb_known_pixels_convert_to_bt601() {
        // White, black, pure red, pure blue in a 2x2 picture.
        let rgb = [255, 255, 255, 0, 0, 0, 255, 0, 0, 0, 0, 255];
        let f = rgb_to_i420(&rgb, 2, 2, false).unwrap();
        assert_eq!(f.y, vec![235, 16, 82, 41]);
        // Chroma from the block's average colour (127, 63, 127).
        let (_, u, v) = rgb_to_yuv(127, 63, 127);
        assert_eq!((f.u[0], f.v[0]), (u, v));
        let red = rgb_to_i420(&[255, 0, 0, 255, 0, 0, 255, 0, 0, 255, 0, 0], 2, 2, false).unwrap();
        assert_eq!((red.y[0], red.u[0], red.v[0]), (82, 90, 240));
        let bgr = rgb_to_i420(&[0, 0, 255, 0, 0, 255, 0, 0, 255, 0, 0, 255], 2, 2, true).unwrap();
        assert_eq!(bgr, red, "BGR red is RGB red");
    }

    #[test]
    fn yuyv_unpacks_luma_and_averages_chroma_rows() {
        // 4x2: row 0 Y=10,20,30,40 U=100,110 V=200,210; row 1 Y=50..80 U=120,130 V=220,230.
        let data = [
            10, 100, 20, 200, 30, 110, 40, 210, //
            50, 120, 60, 220, 70, 130, 80, 230,
        ];
        let f = yuyv_to_i420(&data, 4, 2, 8).unwrap();
        assert_eq!(f.y, vec![10, 20, 30, 40, 50, 60, 70, 80]);
        assert_eq!(f.u, vec![110, 120]);
        assert_eq!(f.v, vec![210, 220]);
        // Padded rows (stride 10) give the same picture.
        let mut padded = Vec::new();
        for row in data.chunks(8) {
            padded.extend_from_slice(row);
            padded.extend_from_slice(&[0xee, 0xee]);
        }
        assert_eq!(yuyv_to_i420(&padded, 4, 2, 10).unwrap(), f);
        assert_eq!(
            to_i420(PixelFormat::Yuyv, &padded, 4, 2).unwrap(),
            f,
            "stride found from the buffer length"
        );
        assert!(
            yuyv_to_i420(&data[..10], 4, 2, 8).is_none(),
            "short buffer refused"
        );
    }

    #[test]
    fn nv12_deinterleaves_chroma_and_crops_odd_sizes() {
        // 2x2 Y, then one UV pair.
        let f = nv12_to_i420(&[1, 2, 3, 4, 100, 200], 2, 2, 2).unwrap();
        assert_eq!((f.y, f.u, f.v), (vec![1, 2, 3, 4], vec![100], vec![200]));
        // 3x3 (odd) crops to 2x2: Y rows of 3, UV rows of 3 bytes (stride 3).
        let data = [1, 2, 9, 3, 4, 9, 9, 9, 9, 100, 200, 9];
        let f = nv12_to_i420(&data, 3, 3, 3).unwrap();
        assert_eq!((f.width, f.height), (2, 2));
        assert_eq!((f.y, f.u, f.v), (vec![1, 2, 3, 4], vec![100], vec![200]));
        let g = gray_to_i420(&[7, 8, 9, 10], 2, 2).unwrap();
        assert_eq!((g.y, g.u), (vec![7, 8, 9, 10], vec![128]));
    }

    #[test]
    fn mjpeg_decodes_to_the_right_size_and_colour() {
        // A 16x8 JPEG: left half red (200, 40, 40), right half grey (128, 128, 128).
        let (w, h) = (16u16, 8u16);
        let mut rgb = Vec::new();
        for _y in 0..h {
            for x in 0..w {
                rgb.extend_from_slice(if x < 8 {
                    &[200, 40, 40]
                } else {
                    &[128, 128, 128]
                });
            }
        }
        let mut jpeg = Vec::new();
        jpeg_encoder::Encoder::new(&mut jpeg, 95)
            .encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        let f = mjpeg_to_i420(&jpeg).expect("decodes");
        assert_eq!((f.width, f.height), (16, 8));
        let (ry, ru, rv) = rgb_to_yuv(200, 40, 40);
        let (gy, gu, gv) = rgb_to_yuv(128, 128, 128);
        let near = |a: u8, b: u8| a.abs_diff(b) <= 4;
        assert!(
            near(f.y[8 * 2 + 2], ry) && near(f.y[8 * 2 + 13], gy),
            "{:?}",
            &f.y[..16]
        );
        // Chroma away from the edge between the halves (JPEG blurs it).
        assert!(
            near(f.u[1], ru) && near(f.v[1], rv),
            "u {} v {}",
            f.u[1],
            f.v[1]
        );
        assert!(near(f.u[6], gu) && near(f.v[6], gv));
        assert!(
            mjpeg_to_i420(&[0xff, 0xd8, 0xff, 0x00, 0x01]).is_none(),
            "garbage refused"
        );
        assert!(mjpeg_to_i420(&[]).is_none());
    }

    #[test]
    #[ignore = "needs a camera"]
    fn a_real_camera_delivers_pictures() {
        let cams = list_cameras().expect("camera list");
        let first = cams.first().expect("at least one camera");
        let mut cam = Camera::open(first.index, 640, 360, 15).expect("camera opens");
        for _ in 0..10 {
            let f = cam.read().expect("a frame");
            assert!(f.picture.width >= 2 && f.picture.height >= 2);
        }
    }

    #[test]
    fn no_camera_is_a_clear_error() {
        // Index far beyond any machine's cameras.
        match Camera::open(4242, 640, 360, 15) {
            Err(e) => assert!(!e.vi().is_empty()),
            Ok(_) => panic!("camera 4242 opened"),
        }
    }
}
