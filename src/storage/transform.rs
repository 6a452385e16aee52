//! Image transforms on download (`?width=&height=&fit=cover|contain&format=webp|jpeg|png`):
//! parsing and checking the parameters, the resize arithmetic, decoding and encoding with the
//! `image` crate, and the cache of results in the backend.
//!
//! A transform is asked for *after* the object's read rule (or its public flag, or a signed
//! URL) has allowed the original, exactly as a plain download; nothing here decides access.
//!
//! Bounds, so that neither one hostile image nor many requests can take the server down: the
//! original's size (`storage.transform.max_input_bytes`) is checked before it is read, its
//! pixel count (`max_pixels`) from its header before anything is decoded (and the decoder
//! runs under `image::Limits` too), the output is at most `max_dimension` a side, and the
//! work runs on blocking threads behind a semaphore (`concurrency`, by default the number of
//! CPUs), so transforms queue instead of starving the async workers.
//!
//! Cache: a result is stored in the backend under `transforms/<bucket>/<blob id>/<hash of
//! the parameters>`, next to nothing a client names. An object's new version has a new blob,
//! so a replaced object can never serve an old transform. Each cached result is listed in
//! the blob trash (no new table, no new backend method) due after `cache_ttl_secs`; when the
//! sweeper removes an object's blob it makes that blob's transforms due at once
//! ([`crate::store::storage::StorageStore::hasten_blobs`]), so they go with it on every
//! backend.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::TransformConfig;
use crate::error::{ApiError, ApiResult};
use crate::store::storage::ObjectRow;

/// JPEG quality of transformed images: visually clean for photos at about a tenth of the
/// size of a PNG.
const JPEG_QUALITY: u8 = 85;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The whole image inside the `width` × `height` box, aspect ratio kept.
    Contain,
    /// The box filled, aspect ratio kept, the overflow cropped around the centre.
    Cover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    /// The format of an original with this content type when none is asked for: its own
    /// when it is one transforms write, else PNG (lossless, and it keeps transparency).
    fn default_for(content_type: &str) -> OutputFormat {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "image/jpeg" | "image/jpg" | "image/pjpeg" => OutputFormat::Jpeg,
            "image/webp" => OutputFormat::Webp,
            _ => OutputFormat::Png,
        }
    }
}

/// The transform query parameters as they came (strings, so a bad value gets this module's
/// error in the JSON envelope rather than the query extractor's).
#[derive(Debug, Default, Clone)]
pub struct TransformQuery<'a> {
    pub width: Option<&'a str>,
    pub height: Option<&'a str>,
    pub fit: Option<&'a str>,
    pub format: Option<&'a str>,
}

/// A checked transform request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Only matters with both `width` and `height`; `Contain` otherwise.
    pub fit: Fit,
    /// `None`: the original's format (see [`OutputFormat::default_for`]).
    pub format: Option<OutputFormat>,
}

impl Transform {
    /// The transform asked for, `None` when the query asks for none.
    pub fn parse(q: &TransformQuery<'_>, max_dimension: u32) -> ApiResult<Option<Transform>> {
        if q.width.is_none() && q.height.is_none() && q.fit.is_none() && q.format.is_none() {
            return Ok(None);
        }
        let side = |field: &str, raw: Option<&str>| -> ApiResult<Option<u32>> {
            let Some(raw) = raw else { return Ok(None) };
            match raw.parse::<u32>() {
                Ok(n) if (1..=max_dimension).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::invalid_with(
                    format!("{field} must be a whole number of pixels from 1 to {max_dimension}"),
                    json!({"field": field}),
                )),
            }
        };
        let width = side("width", q.width)?;
        let height = side("height", q.height)?;
        let fit = match q.fit {
            None | Some("contain") => Fit::Contain,
            Some("cover") => Fit::Cover,
            Some(_) => {
                return Err(ApiError::invalid_with(
                    "fit must be contain or cover",
                    json!({"field": "fit"}),
                ))
            }
        };
        let format = match q.format {
            None => None,
            Some("png") => Some(OutputFormat::Png),
            Some("jpeg") => Some(OutputFormat::Jpeg),
            Some("webp") => Some(OutputFormat::Webp),
            Some(_) => {
                return Err(ApiError::invalid_with(
                    "format must be png, jpeg or webp",
                    json!({"field": "format"}),
                ))
            }
        };
        Ok(Some(Transform {
            width,
            height,
            // One side alone keeps the aspect ratio whatever the fit: one cache entry.
            fit: if width.is_some() && height.is_some() {
                fit
            } else {
                Fit::Contain
            },
            format,
        }))
    }

    /// The format this transform writes for `object`.
    pub fn output_format(&self, object: &ObjectRow) -> OutputFormat {
        self.format
            .unwrap_or_else(|| OutputFormat::default_for(&object.content_type))
    }

    /// The parameters in one canonical form (what the cache key and the ETag hash).
    fn canonical(&self, object: &ObjectRow) -> String {
        let side = |s: Option<u32>| s.map_or_else(|| "-".to_string(), |n| n.to_string());
        format!(
            "v1;w={};h={};fit={};fmt={}",
            side(self.width),
            side(self.height),
            match self.fit {
                Fit::Contain => "contain",
                Fit::Cover => "cover",
            },
            self.output_format(object).name()
        )
    }

    /// The ETag of this transform of `object`: a hash of the original's ETag and the
    /// parameters, so it is known (and `If-None-Match` answered) before any work, and it
    /// changes whenever the original does.
    pub fn etag(&self, object: &ObjectRow) -> String {
        let mut h = Sha256::new();
        h.update(object.etag.as_bytes());
        h.update([0]);
        h.update(self.canonical(object).as_bytes());
        format!("\"t{}\"", hex::encode(&h.finalize()[..16]))
    }

    /// The backend key of the cached result (see the module comment).
    pub fn cache_key(&self, object: &ObjectRow) -> String {
        let digest = Sha256::digest(self.canonical(object).as_bytes());
        format!(
            "{}{}",
            cache_prefix(&object.blob),
            hex::encode(&digest[..16])
        )
    }

    /// The output size for an original of `w` × `h`, and the crop (centred) that follows
    /// the resize for `cover`. Never larger than the original: an image smaller than the box
    /// is served at its own size (a `cover` still crops to the box where it is smaller).
    pub fn plan(&self, w: u32, h: u32) -> Plan {
        let (wf, hf) = (f64::from(w), f64::from(h));
        let scale = match (self.width, self.height, self.fit) {
            (None, None, _) => 1.0,
            (Some(bw), None, _) => f64::from(bw) / wf,
            (None, Some(bh), _) => f64::from(bh) / hf,
            (Some(bw), Some(bh), Fit::Contain) => (f64::from(bw) / wf).min(f64::from(bh) / hf),
            (Some(bw), Some(bh), Fit::Cover) => (f64::from(bw) / wf).max(f64::from(bh) / hf),
        }
        .min(1.0);
        let scaled = |n: f64| ((n * scale).round() as u32).max(1);
        let (rw, rh) = if scale >= 1.0 {
            (w, h)
        } else {
            (scaled(wf), scaled(hf))
        };
        let (cw, ch) = match (self.width, self.height, self.fit) {
            (Some(bw), Some(bh), Fit::Cover) => (bw.min(rw), bh.min(rh)),
            _ => (rw, rh),
        };
        Plan {
            resize: (rw, rh),
            crop: (cw, ch),
        }
    }
}

/// What [`Transform::plan`] decided: resize to `resize`, then keep the centred `crop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub resize: (u32, u32),
    pub crop: (u32, u32),
}

/// The key prefix under which the transforms of the blob `blob` are cached.
pub fn cache_prefix(blob: &str) -> String {
    format!(
        "transforms/{}/",
        blob.strip_prefix("objects/").unwrap_or(blob)
    )
}

/// Whether `blob` is an object's blob (whose cached transforms go when it goes).
pub fn has_transforms(blob: &str) -> bool {
    blob.starts_with("objects/")
}

fn not_an_image() -> ApiError {
    ApiError::UnsupportedMediaType(
        "only PNG, JPEG and WebP images can be transformed; this object is not one".into(),
    )
}

fn too_many_pixels(w: u32, h: u32, max: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the image is {w}×{h} pixels; transforms take at most {max} pixels (storage.transform.max_pixels)"
    ))
}

fn decode_error(err: ImageError, max_pixels: u64) -> ApiError {
    match err {
        ImageError::Limits(e) => ApiError::PayloadTooLarge(format!(
            "decoding the image would pass the transform limits ({e}); at most {max_pixels} pixels"
        )),
        ImageError::IoError(e) => ApiError::internal(e),
        _ => not_an_image(),
    }
}

/// Decodes `input`, applies `transform` and encodes the result as `format`. CPU-bound and
/// memory-hungry: run it on a blocking thread, behind the transform semaphore.
pub fn render(
    input: &[u8],
    transform: &Transform,
    format: OutputFormat,
    limits: &TransformConfig,
) -> ApiResult<Vec<u8>> {
    let reader = || -> ApiResult<ImageReader<Cursor<&[u8]>>> {
        let reader = ImageReader::new(Cursor::new(input))
            .with_guessed_format()
            .map_err(ApiError::internal)?;
        match reader.format() {
            Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => Ok(reader),
            _ => Err(not_an_image()),
        }
    };
    // The header alone first: a small file that claims a huge image (a decompression bomb)
    // is refused here, before the decoder allocates anything for its pixels.
    // (Without the decoder's own limits here, so the answer names the size it claims.)
    let mut header = reader()?;
    header.no_limits();
    let (w, h) = header
        .into_dimensions()
        .map_err(|e| decode_error(e, limits.max_pixels))?;
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(too_many_pixels(w, h, limits.max_pixels));
    }
    let mut decoder_limits = Limits::default();
    decoder_limits.max_image_width = Some(w);
    decoder_limits.max_image_height = Some(h);
    // 16-bit RGBA is 8 bytes a pixel; the rest is room for the decoders' own buffers.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8) + 64 * 1024 * 1024);
    let mut reader = reader()?;
    reader.limits(decoder_limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| decode_error(e, limits.max_pixels))?;
    // Phone photos are stored sideways with an EXIF orientation; transforms serve them
    // upright (the orientation tag is not carried to the output).
    let orientation = decoder.orientation().ok();
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| decode_error(e, limits.max_pixels))?;
    if let Some(o) = orientation {
        image.apply_orientation(o);
    }

    let plan = transform.plan(image.width(), image.height());
    if plan.resize != (image.width(), image.height()) {
        image = image.resize_exact(plan.resize.0, plan.resize.1, FilterType::CatmullRom);
    }
    if plan.crop != plan.resize {
        let x = (plan.resize.0 - plan.crop.0) / 2;
        let y = (plan.resize.1 - plan.crop.1) / 2;
        image = image.crop_imm(x, y, plan.crop.0, plan.crop.1);
    }

    let mut out = Vec::new();
    let encoded = match format {
        OutputFormat::Png => image.write_with_encoder(PngEncoder::new(&mut out)),
        // JPEG has no alpha (and 8 bits a channel).
        OutputFormat::Jpeg => DynamicImage::ImageRgb8(image.to_rgb8())
            .write_with_encoder(JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)),
        // The `image` crate writes lossless WebP only (8 bits a channel).
        OutputFormat::Webp => {
            let image = if image.has_alpha() {
                DynamicImage::ImageRgba8(image.to_rgba8())
            } else {
                DynamicImage::ImageRgb8(image.to_rgb8())
            };
            image.write_with_encoder(WebPEncoder::new_lossless(&mut out))
        }
    };
    encoded.map_err(ApiError::internal)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(width: Option<u32>, height: Option<u32>, fit: Fit) -> Transform {
        Transform {
            width,
            height,
            fit,
            format: None,
        }
    }

    #[test]
    fn plans_keep_the_aspect_ratio_and_never_enlarge() {
        let plan = |tr: Transform, w, h| {
            let p = tr.plan(w, h);
            (p.resize, p.crop)
        };
        // One side: the other follows.
        assert_eq!(
            plan(t(Some(100), None, Fit::Contain), 400, 200),
            ((100, 50), (100, 50))
        );
        assert_eq!(
            plan(t(None, Some(100), Fit::Contain), 400, 200),
            ((200, 100), (200, 100))
        );
        // Contain: inside the box.
        assert_eq!(
            plan(t(Some(100), Some(100), Fit::Contain), 400, 200),
            ((100, 50), (100, 50))
        );
        // Cover: fill the box, crop the rest.
        assert_eq!(
            plan(t(Some(100), Some(100), Fit::Cover), 400, 200),
            ((200, 100), (100, 100))
        );
        // Never larger than the original.
        assert_eq!(
            plan(t(Some(1000), None, Fit::Contain), 400, 200),
            ((400, 200), (400, 200))
        );
        assert_eq!(
            plan(t(Some(1000), Some(100), Fit::Cover), 400, 200),
            ((400, 200), (400, 100))
        );
        // A thin image keeps at least one pixel.
        assert_eq!(
            plan(t(Some(10), None, Fit::Contain), 1000, 1),
            ((10, 1), (10, 1))
        );
    }

    #[test]
    fn parameters_are_checked() {
        let q = |width, height, fit, format| TransformQuery {
            width,
            height,
            fit,
            format,
        };
        assert_eq!(
            Transform::parse(&q(None, None, None, None), 4096).unwrap(),
            None
        );
        let one_side = Transform::parse(&q(Some("10"), None, Some("cover"), None), 4096)
            .unwrap()
            .unwrap();
        assert_eq!(one_side.fit, Fit::Contain);
        for bad in [
            q(Some("0"), None, None, None),
            q(Some("abc"), None, None, None),
            q(Some("-1"), None, None, None),
            q(None, Some("4097"), None, None),
            q(Some("10"), None, Some("stretch"), None),
            q(Some("10"), None, None, Some("gif")),
        ] {
            assert!(Transform::parse(&bad, 4096).is_err(), "{bad:?}");
        }
    }
}
