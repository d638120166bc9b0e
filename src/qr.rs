//! The provisioning URI as a QR code, for setup's `qr_code`: an SVG image in a data URI that a
//! web page can put straight into an `<img>` (SVG keeps the binary small: no raster encoder).

use data_encoding::BASE64;
use qrcode::QrCode;
use qrcode::render::svg;

/// Quiet zone and module size follow the QR specification's recommendations for scanning.
pub fn svg_data_uri(text: &str) -> Option<String> {
    let code = QrCode::new(text.as_bytes()).ok()?;
    let image = code
        .render::<svg::Color<'_>>()
        .min_dimensions(256, 256)
        .quiet_zone(true)
        .build();
    Some(format!(
        "data:image/svg+xml;base64,{}",
        BASE64.encode(image.as_bytes())
    ))
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
        assert!(svg.starts_with("<?xml") && svg.contains("<svg"), "{svg}");
    }
}
