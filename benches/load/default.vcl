# Varnish for the load benchmark: the built-in VCL (which honours Cache-Control) in front
# of the origin; only the backend is declared.
vcl 4.1;

backend origin {
    .host = "127.0.0.1";
    .port = "@ORIGIN_PORT@";
}
