// Swagger UI for the node's OpenAPI schema (/docs). A file, not an inline script, so the
// page keeps a strict Content-Security-Policy; the Swagger UI assets are served by the
// node itself from the pinned swagger-ui-bundle-v2 package (no CDN).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
});
