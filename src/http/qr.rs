//! The provisioning URI as a QR code, for setup's `qr_code`: an SVG image in a data URI that a
//! web page can put straight into an `<img>` (SVG keeps the binary small: no raster encoder).
//! The SVG is drawn here as one path of horizontal runs of dark modules: a quarter of the size
//! of the `qrcode` crate's own SVG (one element per module) and quicker to make.

use std::fmt::Write as _;

use data_encoding::BASE64;
use qrcode::{Color, QrCode};

/// Modules of light margin around the code (the QR specification asks for four).
pub const QUIET_ZONE: usize = 4;

/// The SVG document of `text` as a QR code.
pub fn svg(text: &str) -> Option<String> {
    let code = QrCode::new(text.as_bytes()).ok()?;
    let width = code.width();
    let modules = code.to_colors();
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
        let code = QrCode::new(text.as_bytes()).expect("fits");
        let dark = code
            .to_colors()
            .iter()
            .filter(|c| **c == Color::Dark)
            .count();
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
}
