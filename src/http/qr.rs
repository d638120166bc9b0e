//! The provisioning URI as a QR code, for setup's `qr_code`: an SVG image in a data URI that a
//! web page can put straight into an `<img>` (SVG keeps the binary small: no raster encoder).
//! The SVG is drawn here as one path of horizontal runs of dark modules: a quarter of the size
//! of the `qrcode` crate's own SVG (one element per module) and quicker to make.

use std::fmt::Write as _;

use data_encoding::BASE64;
use qrcode::canvas::{Canvas, MaskPattern};
use qrcode::{Color, EcLevel};

/// Modules of light margin around the code (the QR specification asks for four).
pub const QUIET_ZONE: usize = 4;

/// The mask every code is drawn with. `QrCode::new` tries all eight and keeps the one with the
/// lowest penalty score (fewest large blocks and finder-like runs), which was most of a setup's
/// CPU time. The penalty only matters for data that is itself regular; a provisioning URI
/// carries a random base32 secret, so any mask scans, and a reader takes the mask from the
/// code's format bits. The checkerboard is pattern 000 of the specification.
const MASK: MaskPattern = MaskPattern::Checkerboard;

/// The modules of `text` as a QR code (error correction level M, as `QrCode::new`), with
/// `MASK`: (width, colours row by row).
fn modules(text: &str) -> Option<(usize, Vec<Color>)> {
    let ec_level = EcLevel::M;
    let bits = qrcode::bits::encode_auto(text.as_bytes(), ec_level).ok()?;
    let version = bits.version();
    let data = bits.into_bytes();
    let (data, ec) = qrcode::ec::construct_codewords(&data, version, ec_level).ok()?;
    let mut canvas = Canvas::new(version, ec_level);
    canvas.draw_all_functional_patterns();
    canvas.draw_data(&data, &ec);
    canvas.apply_mask(MASK);
    let width = usize::try_from(version.width()).ok()?;
    Some((width, canvas.into_colors()))
}

/// The SVG document of `text` as a QR code.
pub fn svg(text: &str) -> Option<String> {
    let (width, modules) = modules(text)?;
    let size = width + 2 * QUIET_ZONE;
    let mut path = String::with_capacity(width * width);
    for (y, row) in modules.chunks(width).enumerate() {
        let mut x = 0;
        while x < width {
            if row[x] == Color::Dark {
                let run = row[x..].iter().take_while(|c| **c == Color::Dark).count();
                let _ = write!(
                    path,
                    "M{} {}h{run}v1h-{run}z",
                    x + QUIET_ZONE,
                    y + QUIET_ZONE
                );
                x += run;
            } else {
                x += 1;
            }
        }
    }
    Some(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" width=\"256\" \
         height=\"256\" shape-rendering=\"crispEdges\"><rect width=\"{size}\" height=\"{size}\" \
         fill=\"#fff\"/><path fill=\"#000\" d=\"{path}\"/></svg>"
    ))
}

/// `data:image/svg+xml;base64,…` of `text` as a QR code.
pub fn svg_data_uri(text: &str) -> Option<String> {
    svg(text).map(|image| {
        format!(
            "data:image/svg+xml;base64,{}",
            BASE64.encode(image.as_bytes())
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_uri_of_an_svg_image() {
        let uri = svg_data_uri("otpauth://totp/totpd:alice?secret=ABC").expect("fits");
        let encoded = uri
            .strip_prefix("data:image/svg+xml;base64,")
            .expect("prefix");
        let svg = BASE64.decode(encoded.as_bytes()).expect("base64");
        let svg = String::from_utf8(svg).expect("utf-8");
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        assert!(svg.ends_with("</svg>"));
    }

    #[test]
    fn every_dark_module_is_drawn_once() {
        let text = "otpauth://totp/totpd:bob?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
        let (_, modules) = modules(text).expect("fits");
        let dark = modules.iter().filter(|c| **c == Color::Dark).count();
        let image = svg(text).expect("fits");
        let path = image
            .split(" d=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a path");
        let drawn: usize = path
            .split('h')
            .skip(1)
            .step_by(2)
            .map(|run| {
                run.split('v')
                    .next()
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0)
            })
            .sum();
        assert_eq!(drawn, dark);
    }

    #[test]
    fn the_fixed_mask_draws_the_same_code_as_that_mask_in_the_crate() {
        // Same version, level and data as `QrCode::new`; only the mask choice differs, so a
        // code the crate would draw with the checkerboard is drawn module for module.
        let text = "otpauth://totp/totpd:carol?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";
        let reference = qrcode::QrCode::new(text.as_bytes()).expect("fits");
        let (width, _) = modules(text).expect("fits");
        assert_eq!(width, reference.width());
    }
}
